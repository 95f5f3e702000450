"""Progress of long work (checkpoint uploads and downloads, validation) as log lines: nothing while the work is quick,
then a line every few seconds that says how far it got, and a last line when it is done.

A log line rather than a tqdm bar: training output goes to log files and cluster consoles, where a bar that redraws
itself with carriage returns turns into noise. Lines go to the given logger at INFO, which only the logging rank
prints (evods.training.metrics.setup_logging).
"""
import logging
import threading
import time
from collections.abc import Callable

FIRST_LINE_AFTER_S = 5.0
LINE_EVERY_S = 15.0
_UNITS = ((1024**3, "GiB"), (1024**2, "MiB"), (1024, "KiB"))


def _amount(value: float, unit: str) -> str:
    if unit != "bytes":
        return f"{value:g} {unit}"
    for size, name in _UNITS:
        if value >= size:
            return f"{value / size:.1f} {name}"
    return f"{value:g} B"


class Progress:
    """`advance(n)` as the work goes on (from any thread); `finish()` at the end. `total` may be None (unknown)."""

    def __init__(self, what: str, total: float | None, unit: str, logger: logging.Logger,
                 clock: Callable[[], float] = time.monotonic):
        self.what, self.total, self.unit, self.logger, self.clock = what, total, unit, logger, clock
        self.first_after_s, self.every_s = FIRST_LINE_AFTER_S, LINE_EVERY_S
        self.done = 0.0
        self.started = clock()
        self._next_line = self.started + self.first_after_s
        self._spoke = False
        self._lock = threading.Lock()

    def advance(self, amount: float = 1) -> None:
        with self._lock:
            self.done += amount
        self.tick()

    def advance_to(self, done: float) -> None:
        with self._lock:
            self.done = done
        self.tick()

    def tick(self) -> None:
        """Log a line if one is due (also for waits that make no progress of their own)."""
        now = self.clock()
        with self._lock:
            if now < self._next_line:
                return
            self._next_line = now + self.every_s
            self._spoke = True
        self.logger.info("%s: %s, %.0f s so far", self.what, self._position(), now - self.started)

    def finish(self) -> None:
        """A closing line, only when progress lines were printed (quick work stays silent)."""
        if self._spoke:
            self.logger.info("%s: done, %s in %.0f s", self.what, _amount(self.done, self.unit),
                             self.clock() - self.started)

    def _position(self) -> str:
        if not self.total:
            return _amount(self.done, self.unit)
        share = 100 * self.done / self.total
        return f"{_amount(self.done, self.unit)} of {_amount(self.total, self.unit)} ({share:.0f}%)"
