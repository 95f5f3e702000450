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


def profiled_training(cfg, run_dir, steps: int) -> tuple:
    """Build evods' Trainer for `cfg` and train: two steps under the memory profiler (the second runs with every
    optimizer state and DeepSpeed buffer in place), then `steps` timed steps without it. Returns (trainer, peak
    bytes, bytes held after the second step, median seconds per timed step)."""
    import statistics
    import time

    from torch.profiler import ProfilerActivity, profile

    from evods.training.trainer import Trainer

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainer = Trainer(cfg, run_dir=run_dir)
        batches = iter(trainer.loader)
        for _ in range(2):
            trainer.engine.train_step(next(batches))
    peak, held = allocator_peak(prof)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.engine.train_step(next(batches))
        times.append(time.perf_counter() - start)
    return trainer, peak, held, statistics.median(times)
