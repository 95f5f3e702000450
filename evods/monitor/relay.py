"""Alerts from ranks that do not send, carried to the one that does through the process group's key-value store.

An exception or a failed upload can happen on any rank, but one rank sends (so a 1000-rank run does not post 1000
copies). The store (the TCPStore that torch.distributed started with) is not a collective: it works while the sending
rank is blocked in an all-reduce waiting for the rank that failed, which is exactly when the alert matters.

Keys: "count" numbers the alerts; "alert/N" holds alert N ({"text", "fatal"}: fatal alerts end the run); "done/N"
is set by the sending rank once alert N was posted; "failures" counts ranks that reported an exception, so only the
first failure of a run is alerted (the others usually follow from it: their peer went away).
"""
import json
import logging
import threading
from collections.abc import Callable
from typing import Optional, TypeVar

import torch.distributed as dist

logger = logging.getLogger("evods.monitor")
T = TypeVar("T")

PREFIX = "evods-monitor/"


def bounded(work: Callable[[], T], timeout_s: float) -> T | None:
    """`work()` in a daemon thread; None when it fails or takes longer than `timeout_s`. A store whose host died
    blocks for the process group's timeout (30 minutes): a failing rank must not wait that long to exit."""
    result: list = []

    def target():
        try:
            result.append(work())
        except Exception:  # noqa: BLE001 - an unreachable store means: no relay
            pass

    thread = threading.Thread(target=target, name="evods-monitor-store", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return result[0] if result else None


class StoreRelay:
    def __init__(self, store):
        self.store = dist.PrefixStore(PREFIX, store)
        self._next = 1  # the sending rank: the next alert number to read

    @classmethod
    def of_process_group(cls) -> Optional["StoreRelay"]:
        if not dist.is_initialized():
            return None
        try:
            # torch has no public accessor for the default group's store; this one is stable across 2.x releases.
            return cls(dist.distributed_c10d._get_default_store())
        except (AttributeError, RuntimeError, ValueError):
            return None

    # ---------------------------------------------------------------------------- ranks that do not send

    def claim_first_failure(self) -> bool:
        return self.store.add("failures", 1) == 1

    def publish(self, text: str, fatal: bool) -> int:
        number = self.store.add("count", 1)
        self.store.set(f"alert/{number}", json.dumps({"text": text, "fatal": fatal}))
        return number

    def delivered(self, number: int) -> bool:
        return self.store.check([f"done/{number}"])

    # ---------------------------------------------------------------------------- the sending rank

    def take_new(self) -> list[tuple[int, str, bool]]:
        """(number, text, fatal) of the alerts published since the last call, in order."""
        count = self.store.add("count", 0)
        taken = []
        while self._next <= count and self.store.check([f"alert/{self._next}"]):
            alert = json.loads(self.store.get(f"alert/{self._next}"))
            taken.append((self._next, alert["text"], alert["fatal"]))
            self._next += 1
        return taken

    def mark_delivered(self, number: int) -> None:
        self.store.set(f"done/{number}", "1")
