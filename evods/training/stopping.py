"""Stopping a run on request: SIGTERM or SIGINT (Ctrl-C) finish the running step, cut validation short, save a
checkpoint of the last finished step and exit cleanly.

Launchers give the ranks a fixed time between their stop signal and SIGKILL:
- DeepSpeed's launcher (deepspeed/launcher/launch.py, sigkill_handler -> terminate_process_tree) sends SIGTERM to
  each rank's process tree in turn, waits 30 s (psutil.wait_procs(timeout=30)), then kills; no option or
  environment variable changes it, and the launcher itself then exits 1;
- torchrun waits --shutdown-timeout / TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30);
- Slurm waits KillWait seconds (default 30) after scancel or the time limit; the job cannot read the value.
So the stop has about 30 s: rank 0 logs a warning well before that when the checkpoint is not complete yet.
"""
import logging
import os
import signal
import threading
import time

import torch
import torch.distributed as dist

logger = logging.getLogger("evods")

DEFAULT_KILL_WINDOW_S = 30.0
# The warning comes this share of the window after the signal, so that it is in the log before the kill.
WARN_AT_SHARE = 2 / 3


def kill_window_s(environ=os.environ) -> float:
    """Seconds the launcher of this process leaves between its stop signal and SIGKILL (see the module doc)."""
    if environ.get("TORCHELASTIC_RUN_ID") and environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
        return float(environ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
    return DEFAULT_KILL_WINDOW_S


def _is_rank0() -> bool:
    return (dist.get_rank() if dist.is_initialized() else 0) == 0


class GracefulStop:
    """Catches SIGTERM and SIGINT for the duration of training (`close` puts the previous handlers back)."""

    def __init__(self, kill_window: float | None = None):
        self.kill_window = kill_window_s() if kill_window is None else kill_window
        self.requested_at: float | None = None  # when this rank got the signal, or learnt of another rank's
        self._saved = threading.Event()
        self._timer: threading.Timer | None = None
        self._previous = {sig: signal.signal(sig, self._request) for sig in (signal.SIGTERM, signal.SIGINT)}

    def _request(self, signum, _frame) -> None:
        if self.requested_at is not None:
            if _is_rank0():
                logger.warning("received %s again: already stopping (the checkpoint is being written)",
                               signal.Signals(signum).name)
            return
        if _is_rank0():
            logger.warning("received %s: finishing this step, then saving a checkpoint and stopping",
                           signal.Signals(signum).name)
        self._start_clock()

    def _start_clock(self) -> None:
        self.requested_at = time.monotonic()
        if _is_rank0():
            self._timer = threading.Timer(self.kill_window * WARN_AT_SHARE, self._warn_late)
            self._timer.daemon = True
            self._timer.start()

    def _warn_late(self) -> None:
        if not self._saved.is_set():
            logger.error("the stop was requested %.0f s ago and its checkpoint is not complete yet: launchers kill "
                         "the ranks about %.0f s after their signal, and then the run resumes from its previous "
                         "checkpoint. To give a save all the time it needs, stop with ckpt.stop_file_path or signal "
                         "the ranks themselves, not the launcher (README: Stopping, faults and trust)",
                         time.monotonic() - self.requested_at, self.kill_window)

    @property
    def requested(self) -> bool:
        return self.requested_at is not None

    def agreed(self) -> bool:
        """Whether any rank got a stop signal; every rank must call it at the same point, so that all stop at the
        same step (one all-reduce)."""
        flag = torch.tensor([int(self.requested)])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and not self.requested:
            self._start_clock()
        return bool(flag.item())

    def saved(self, what: str) -> None:
        """The stop's checkpoint is complete: no late warning; say how long the stop took."""
        self._saved.set()
        if self.requested_at is not None and _is_rank0():
            logger.warning("%s %.1f s after the stop request", what, time.monotonic() - self.requested_at)

    def close(self) -> None:
        self._saved.set()
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
