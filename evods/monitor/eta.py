"""The progress (ETA) line of a training run: steps done of the total, time elapsed, and time left at the recent
rate. (evods.progress.Progress is the other kind of progress: lines about one long piece of work, such as an
upload.)"""
import collections
import time
from collections.abc import Callable
from datetime import timedelta

RECENT_STEPS = 50  # the rate is measured over this many of the latest steps


def format_duration(seconds: float) -> str:
    """'1 day, 3:04:05' style, without fractions of a second."""
    return str(timedelta(seconds=round(max(seconds, 0.0))))


class TrainingEta:
    def __init__(self, total_steps: int, every: int, clock: Callable[[], float] = time.monotonic):
        self.total_steps = total_steps
        self.every = every
        self.clock = clock
        self.start = clock()
        self._recent: collections.deque = collections.deque(maxlen=RECENT_STEPS + 1)  # (time, step count)

    def line(self, step_count: int) -> str | None:
        """After optimizer step `step_count`: the line to log at the first step of this launch (step 1, or the
        first after a resume) and every `every` steps."""
        now = self.clock()
        first = not self._recent
        if first:
            self._recent.append((self.start, step_count - 1))
        self._recent.append((now, step_count))
        if not first and step_count % self.every:
            return None
        then, count_then = self._recent[0]
        per_step = (now - then) / (step_count - count_then)
        left = (self.total_steps - step_count) * per_step
        return (f"progress: step {step_count}/{self.total_steps} ({100 * step_count / self.total_steps:.1f}%), "
                f"elapsed {format_duration(now - self.start)}, left ~{format_duration(left)} "
                f"at {per_step:.2f} s/step")
