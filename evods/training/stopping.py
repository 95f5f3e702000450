"""Stopping a run on request: SIGTERM or SIGINT (Ctrl-C) finish the running step, cut validation short, save a
checkpoint of the last finished step and exit cleanly.

Launchers give the ranks a fixed time between their stop signal and SIGKILL:
- DeepSpeed's launcher (deepspeed/launcher/launch.py, sigkill_handler -> terminate_process_tree) sends SIGTERM to
  each rank's process tree in turn, waits 30 s (psutil.wait_procs(timeout=30)), then kills; no option or
  environment variable changes it, and the launcher itself then exits 1;
- torchrun waits --shutdown-timeout / TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds (default 30);
- Slurm waits KillWait seconds (default 30) after scancel or the time limit; the job cannot read the value.
So the stop has about 30 s: the logging rank warns well before that when the checkpoint is not complete yet.

A launcher that is gone stops the run the same way. SIGTERM to the `deepspeed` command itself (a job scheduler or a
`kill` of its pid) ends that process only: its launch.py child and the ranks would train on to the end, unsaved if
stopped later. Each rank watches the launcher processes above it (DeepSpeed's runner and launch.py, torchrun) and
saves and stops once one of them is gone; no kill follows then, so there is no time limit.
"""
import logging
import os
import signal
import threading
import time

import psutil
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


# The commands that start ranks (as `python -m MODULE` or a script of that name): DeepSpeed's runner (the `deepspeed`
# command) and its per-node launch.py, torchrun.
LAUNCHERS = {"deepspeed", "deepspeed.launcher.runner", "deepspeed.launcher.launch", "torchrun", "torch.distributed.run"}
WATCH_EVERY_S = 1.0


def launcher_name(cmdline: list[str]) -> str | None:
    """The launcher a command line runs ("deepspeed.launcher.launch" for `python -u -m deepspeed.launcher.launch
    ...`, "deepspeed" for `python .../bin/deepspeed ...`), or None for anything else."""
    args = iter(cmdline[1:])  # after the interpreter: its options, then `-m module` or the script
    for arg in args:
        if arg == "-m":
            name = next(args, "")
            break
        if not arg.startswith("-"):
            name = os.path.basename(arg)
            break
    else:
        return None
    return name if name in LAUNCHERS else None


def launcher_processes() -> list[psutil.Process]:
    """The launchers above this process, nearest first (launch.py, then the `deepspeed` command); [] when a
    launcher of another kind (srun, a test harness) started it."""
    chain, process = [], psutil.Process().parent()
    while process is not None:
        try:
            if launcher_name(process.cmdline()) is None:
                break
        except psutil.Error:
            break
        chain.append(process)
        process = process.parent()
    return chain


def _is_gone(process: psutil.Process) -> bool:
    try:
        return not process.is_running() or process.status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return True


class GracefulStop:
    """Catches SIGTERM and SIGINT, and watches the launcher processes above this rank, for the duration of training
    (`close` puts the previous handlers back). `speaks`: this rank logs the stop (the logging rank).
    `launchers`: the processes to watch (default: launcher_processes())."""

    def __init__(self, kill_window: float | None = None, speaks: bool = True,
                 launchers: list[psutil.Process] | None = None):
        self.kill_window = kill_window_s() if kill_window is None else kill_window
        self.speaks = speaks
        self.requested_at: float | None = None  # when this rank got the signal, or learnt of another rank's
        self._saved = threading.Event()
        self._closed = threading.Event()
        # One stop start, whoever sees the cause first: the signal handler and agreed() (main thread) or the launcher
        # watch. Reentrant, because a signal handler runs in the main thread, which may hold it.
        self._starting = threading.RLock()
        self._timer: threading.Timer | None = None
        self._previous = {sig: signal.signal(sig, self._request) for sig in (signal.SIGTERM, signal.SIGINT)}
        self._launchers = launcher_processes() if launchers is None else launchers
        if self._launchers:
            threading.Thread(target=self._watch_launchers, name="evods-launcher-watch", daemon=True).start()

    def _request(self, signum, _frame) -> None:
        with self._starting:
            if self.requested_at is not None:
                if self.speaks:
                    logger.warning("received %s again: already stopping (the checkpoint is being written)",
                                   signal.Signals(signum).name)
                return
            if self.speaks:
                logger.warning("received %s: finishing this step, then saving a checkpoint and stopping",
                               signal.Signals(signum).name)
            self._start_clock()

    def _watch_launchers(self) -> None:
        while not self._closed.wait(WATCH_EVERY_S):
            if self._stop_if_a_launcher_is_gone():
                return

    def _stop_if_a_launcher_is_gone(self) -> bool:
        """Start the stop, saying why, when a launcher above this rank is gone (no kill follows); whether one is."""
        gone = next((process for process in self._launchers if _is_gone(process)), None)
        if gone is None:
            return False
        with self._starting:
            if self.requested_at is None:
                if self.speaks:
                    logger.warning("the launcher that started this job (pid %d) is gone: finishing this step, "
                                   "then saving a checkpoint and stopping", gone.pid)
                self._start_clock(kill_coming=False)
        return True

    def _start_clock(self, kill_coming: bool = True) -> None:
        self.requested_at = time.monotonic()
        if self.speaks and kill_coming:
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
            # Another rank stopped first. Its cause is this rank's too when it is a launcher both share (the ranks of
            # a node have the same ones): said here then, so that the logging rank's log says why it stops.
            if not self._stop_if_a_launcher_is_gone():
                with self._starting:
                    if self.requested_at is None:
                        self._start_clock()
        return bool(flag.item())

    def saved(self, what: str) -> None:
        """The stop's checkpoint is complete: no late warning; say how long the stop took."""
        self._saved.set()
        if self.requested_at is not None and self.speaks:
            logger.warning("%s %.1f s after the stop request", what, time.monotonic() - self.requested_at)

    def close(self) -> None:
        self._saved.set()
        self._closed.set()
        if self._timer is not None:
            self._timer.cancel()
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
