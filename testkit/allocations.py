"""torch's own CPU allocation records, for benches that measure memory: a process's RSS would mostly show start-up
and the allocator's caching."""


def allocator_peak(prof) -> tuple[int, int]:
    """The highest sum of torch CPU allocations minus frees within the window of `prof` (a torch.profiler.profile run
    with profile_memory=True), and the sum at its end."""
    import torch

    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU)
    current = peak = 0
    for _, nbytes in events:
        current += nbytes
        peak = max(peak, current)
    return peak, current
