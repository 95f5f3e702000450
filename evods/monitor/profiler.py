"""`train_ds.py --profiling`: the torch profiler over a few steps after warm-up, as InternEvo's
initialize_llm_profile (internlm/train/pipeline.py), on CPU too.

The trace is a Chrome trace (chrome://tracing, ui.perfetto.dev, or TensorBoard's profiler plugin) in
`{run_dir}/traces/`. The profiler's own module hierarchy (`with_modules`) works only for TorchScript, so every
module's forward is wrapped in a `record_function` span named by its path in the model
("model.layers.0.mlp.gate_proj"): the trace shows which layer an operator belongs to.
"""
import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule, tensorboard_trace_handler

logger = logging.getLogger("evods.monitor")

# Steps (trained batches) of the schedule: the first steps allocate and warm caches, so they are skipped.
WAIT_STEPS, WARMUP_STEPS, ACTIVE_STEPS = 2, 1, 2
TOP_OPERATORS = 5


class _ModuleSpans:
    """A `record_function` span around each named module's forward, while installed."""

    def __init__(self, model: torch.nn.Module):
        self.names = set()
        self._open: dict[int, list] = {}
        self._handles = []
        for name, module in model.named_modules():
            if name:
                self.names.add(name)
                self._handles.append(module.register_forward_pre_hook(self._enter(name)))
                self._handles.append(module.register_forward_hook(self._exit))

    def _enter(self, name: str):
        def hook(module, _inputs):
            span = record_function(name)
            span.__enter__()
            self._open.setdefault(id(module), []).append(span)
        return hook

    def _exit(self, module, _inputs, _output):
        spans = self._open.get(id(module))
        if spans:
            spans.pop().__exit__(None, None, None)

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class StepProfiler:
    def __init__(self, model: torch.nn.Module, trace_dir: Path, worker_name: str):
        self.trace_dir = Path(trace_dir)
        self.worker_name = worker_name
        self._spans = _ModuleSpans(model)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._device_time = torch.cuda.is_available()
        self._done = False
        self._profile = profile(activities=activities,
                                schedule=schedule(wait=WAIT_STEPS, warmup=WARMUP_STEPS, active=ACTIVE_STEPS, repeat=1),
                                on_trace_ready=self._trace_ready, record_shapes=True, profile_memory=True)
        self._profile.start()
        logger.info("profiling: steps %d-%d of this run go to %s", WAIT_STEPS + WARMUP_STEPS,
                    WAIT_STEPS + WARMUP_STEPS + ACTIVE_STEPS - 1, self.trace_dir)

    def step(self) -> None:
        """After every trained batch."""
        if not self._done:
            self._profile.step()

    def close(self) -> None:
        if self._done:
            return
        self._profile.stop()  # writes the trace if the run ended inside the profiled steps
        if not self._done:
            logger.warning("profiling: the run ended before the profiled steps; it needs at least %d trained batches",
                           WAIT_STEPS + WARMUP_STEPS + ACTIVE_STEPS)
            self._finish()

    def _trace_ready(self, prof: profile) -> None:
        self.trace_dir.mkdir(parents=True, exist_ok=True)
        tensorboard_trace_handler(str(self.trace_dir), worker_name=self.worker_name)(prof)
        traces = sorted(self.trace_dir.glob(f"{self.worker_name}.*.json"), key=lambda p: p.stat().st_mtime)
        logger.info("profiling: trace in %s; %s", traces[-1] if traces else self.trace_dir, self._summary(prof))
        self._finish()

    def _finish(self) -> None:
        self._done = True
        self._spans.remove()

    def _summary(self, prof: profile) -> str:
        """The top operators by self time (device time on GPUs), without evods' module spans."""
        attribute = "self_device_time_total" if self._device_time else "self_cpu_time_total"
        operators = [event for event in prof.key_averages()
                     if event.key not in self._spans.names and not event.key.startswith("ProfilerStep")]
        total = sum(getattr(event, attribute) for event in operators) or 1.0
        top = sorted(operators, key=lambda event: getattr(event, attribute), reverse=True)[:TOP_OPERATORS]
        where = "device" if self._device_time else "CPU"
        return f"top operators by self {where} time: " + ", ".join(
            f"{event.key} {100 * getattr(event, attribute) / total:.1f}% ({getattr(event, attribute) / 1e3:.1f} ms)"
            for event in top)
