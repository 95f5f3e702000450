"""The stuck watchdog: no finished step for `timeout_s` seconds is one "stuck" episode, alerted once.

InternEvo's MonitorTracker compares a timestamp every 300 s, so it repeats its alert every 5 minutes of a hang and
may take up to twice the interval to notice one. Here the owner calls `check()` often (every second or so): the
alert comes within a second of the timeout, once, and the first step after the hang ends the episode (`beat()`
returns that event at once).
"""
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class StuckEvent:
    stuck: bool  # True: a hang began; False: a step finished after one
    idle_s: float  # seconds without a step
    last_step: int | None  # the last finished step, None before the first


class StuckWatchdog:
    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic):
        self.timeout_s = timeout_s
        self.clock = clock
        self._last_beat = clock()
        self._last_step: int | None = None
        self._stuck_since: float | None = None
        self._lock = threading.Lock()  # beat() runs in the training loop, check() in the monitor's thread

    def beat(self, step: int) -> StuckEvent | None:
        """A step finished; the end of a stuck episode, if this step ends one."""
        with self._lock:
            now = self.clock()
            resumed = None
            if self._stuck_since is not None:
                resumed = StuckEvent(False, now - self._last_beat, step)
                self._stuck_since = None
            self._last_beat, self._last_step = now, step
            return resumed

    def check(self) -> StuckEvent | None:
        """The stuck episode that began since the last check, if any."""
        with self._lock:
            idle = self.clock() - self._last_beat
            if idle >= self.timeout_s and self._stuck_since is None:
                self._stuck_since = self._last_beat
                return StuckEvent(True, idle, self._last_step)
            return None
