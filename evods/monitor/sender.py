"""JSON POSTs to one endpoint from a background thread: a training step never waits for the network.

The queue is bounded (the oldest message is dropped, and counted, when it is full), each request has a timeout, and a
failing endpoint costs one warning for the whole run. The URL is never logged: webhook URLs carry their credential.
"""
import collections
import json
import logging
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable

logger = logging.getLogger("evods.monitor")

REQUEST_TIMEOUT_S = 5.0
MAX_QUEUED = 256
CLOSE_TIMEOUT_S = 5.0  # what the end of a run waits, at most, for the last messages


class WebhookSender:
    def __init__(self, url: str, what: str, user_agent: str, timeout_s: float = REQUEST_TIMEOUT_S,
                 max_queued: int = MAX_QUEUED):
        """`what` names the endpoint in log lines ("the Feishu alert webhook") in place of its URL."""
        self._url = url
        self._secrets = [url, urllib.parse.urlsplit(url).path, urllib.parse.urlsplit(url).query]
        self.what = what
        self.user_agent = user_agent
        self.timeout_s = timeout_s
        self.max_queued = max_queued
        self.delivered = self.failed = self.dropped = 0
        self._queue: collections.deque = collections.deque()
        self._busy = False
        self._closing = False
        self._warned = False
        self._failing = False
        self._lock = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="evods-monitor-sender", daemon=True)
        self._thread.start()

    def post(self, body: dict, on_done: Callable[[bool], None] | None = None) -> None:
        """Queue `body` and return at once. `on_done(delivered)` runs in the sender thread after the attempt."""
        with self._lock:
            if self._closing:
                self.dropped += 1
                return
            if len(self._queue) >= self.max_queued:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append((body, on_done))
            self._lock.notify()

    def _run(self) -> None:
        while True:
            with self._lock:
                while not self._queue and not self._closing:
                    self._lock.wait()
                if not self._queue:
                    return
                body, on_done = self._queue.popleft()
                self._busy = True
            delivered = self._send(body)
            with self._lock:
                self._busy = False
                self._lock.notify_all()
            if on_done is not None:
                try:
                    on_done(delivered)
                except Exception:  # noqa: BLE001 - a callback must not stop the sender
                    logger.exception("monitor: a delivery callback of %s failed", self.what)

    def _send(self, body: dict) -> bool:
        request = urllib.request.Request(
            self._url, data=json.dumps(body, ensure_ascii=False).encode("utf-8"), method="POST",
            headers={"Content-Type": "application/json;charset=utf-8", "User-Agent": self.user_agent})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                refusal = _refusal(response.read())
        except Exception as error:  # noqa: BLE001 - any failure is counted and, once, reported
            self._failed(f"{type(error).__name__}: {error}")
            return False
        if refusal:
            self._failed(refusal)
            return False
        self.delivered += 1
        if self._failing:
            self._failing = False
            logger.info("monitor: %s takes messages again", self.what)
        return True

    def _warn_once(self) -> bool:
        with self._lock:
            first, self._warned = not self._warned, True
        return first

    def _failed(self, reason: str) -> None:
        self.failed += 1
        self._failing = True
        if self._warn_once():
            logger.warning("monitor: %s did not take a message (%s); training goes on, and later failures of this "
                           "endpoint are not logged", self.what, self._scrub(reason))

    def _scrub(self, text: str) -> str:
        for secret in filter(None, self._secrets):
            text = text.replace(secret, "<hidden>")
        return text

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until every queued message was attempted, or `timeout_s` passed; True when idle."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """Deliver what is queued within `timeout_s`, then stop; report what never went out."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        self._thread.join(timeout_s)
        with self._lock:
            left = len(self._queue) + int(self._busy)
        lost = self.failed + self.dropped + left
        if not lost:
            return
        message = (f"monitor: {lost} messages to {self.what} were not delivered ({self.failed} failed, "
                   f"{self.dropped} dropped from the full queue, {left} still waiting at the end)")
        if self._warn_once():  # the only warning about this endpoint
            logger.warning(message)
        else:
            logger.info(message)


def _refusal(answer: bytes) -> str | None:
    """Feishu answers HTTP 200 with {"code": non-zero, "msg": ...} when it refuses a message (a bad signature, a
    missing keyword); that is a failure too."""
    try:
        reply = json.loads(answer)
    except ValueError:
        return None
    if isinstance(reply, dict):
        code = reply.get("code", reply.get("StatusCode", 0))
        if code not in (0, None):
            return f"the endpoint answered code {code}: {reply.get('msg') or reply.get('StatusMessage')}"
    return None
