"""What the training loop tells the monitor, and what the monitor sends: alerts, heartbeats and the progress line.

One rank sends: the one that prints the metrics line (data rank 0, tensor rank 0, last pipeline stage). Other ranks
only ever report their own failures (an exception, a checkpoint upload), through the store relay.
"""
import logging
import socket
import threading
import time
import traceback

from evods.config import AlertConfig, TrainConfig, check_topology

from .eta import TrainingEta, format_duration
from .payloads import alert_body, heartbeat, job_title
from .relay import StoreRelay, bounded
from .sender import CLOSE_TIMEOUT_S, REQUEST_TIMEOUT_S, WebhookSender
from .watchdog import StuckWatchdog

logger = logging.getLogger("evods.monitor")

MAX_TEXT = 4000  # characters of one alert; Feishu refuses very long posts
TRACEBACK_LINES = 10  # as InternEvo's MonitorManager.monitor_exception
RELAY_POLL_S = 1.0
RELAY_STORE_TIMEOUT_S = 5.0
# How long a failing rank waits for the sending rank to post its exception before it posts it itself.
RELAY_DELIVERY_TIMEOUT_S = REQUEST_TIMEOUT_S + 3 * RELAY_POLL_S + 2.0


class _Ticker:
    """Calls `tick()` every `interval_s` seconds in a daemon thread until stopped."""

    def __init__(self, interval_s: float, tick, name: str):
        self._stop = threading.Event()
        self._interval_s, self._tick = interval_s, tick
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self._tick()
            except Exception:  # noqa: BLE001 - monitoring never takes the run down
                logger.debug("monitor: %s failed", self._thread.name, exc_info=True)

    def stop(self) -> None:
        self._stop.set()


class RunMonitor:
    def __init__(self, alert: AlertConfig, *, job_name: str, rank: int, sends: bool, total_steps: int,
                 log_every: int, relay: StoreRelay | None = None):
        """`sends`: this is the rank that posts (the log rank). `relay` carries other ranks' failures to it."""
        self.rank, self.sends = rank, sends
        self.host = socket.gethostname()
        self.title = job_title(job_name)
        self.format = alert.webhook_format
        self.spike_limit = alert.loss_spike_limit
        self.total_steps = total_steps
        self._user_agent = f"evods (rank {rank}, {self.host})"
        self._alert_url = alert.feishu_alert_address if alert.enable_feishu_alert else None
        self._relay = relay if self._alert_url else None
        self._alerts = self._sender(self._alert_url, f"the {self.format} alert webhook") if sends else None
        self._heartbeats = self._sender(alert.light_monitor_address, "the light-monitor endpoint") if sends else None
        self._eta = TrainingEta(total_steps, log_every)
        self._watchdog = StuckWatchdog(alert.stuck_timeout)
        self._tickers: list[_Ticker] = []
        self._watchdog_ticker: _Ticker | None = None
        self._alerted_errors: list[BaseException] = []
        self._started = time.monotonic()
        self.last_step: int | None = None
        self.last_step_count = 0
        self._first_loss: float | None = None  # of this launch, for the summary
        self._previous_loss: float | None = None
        self._closed = False
        if self._alerts is not None and self._relay is not None:  # from now on: a rank may fail while building
            self._tickers.append(_Ticker(RELAY_POLL_S, self._forward_relayed, "evods-monitor-relay"))

    @classmethod
    def for_run(cls, cfg: TrainConfig, rank: int, world: int) -> "RunMonitor":
        # The rank that prints the metrics line (TrainEngine.is_log_rank): it sees the loss.
        sends = check_topology(cfg, world, rank).is_log_rank
        return cls(cfg.monitor.alert, job_name=cfg.JOB_NAME, rank=rank, sends=sends,
                   total_steps=cfg.data.total_steps, log_every=cfg.monitor.log_every,
                   relay=StoreRelay.of_process_group())

    def _sender(self, url: str | None, what: str) -> WebhookSender | None:
        return WebhookSender(url, what, self._user_agent) if url else None

    # ------------------------------------------------------------------------------------ the loop's hooks

    def run_started(self, *, dp: int, pp: int, tp: int, parameters: int, run_dir) -> None:
        self._started = time.monotonic()
        self._eta = TrainingEta(self.total_steps, self._eta.every)
        self._watchdog = StuckWatchdog(self._watchdog.timeout_s)
        if self._alerts is None:
            return
        self._watchdog_ticker = _Ticker(min(1.0, self._watchdog.timeout_s / 4), self._check_stuck, "evods-watchdog")
        self._tickers.append(self._watchdog_ticker)
        self._alert(f"Training in {self.host} is starting.\n"
                    f"{dp * pp * tp} ranks (data {dp} × pipeline {pp} × tensor {tp}), model of "
                    f"{parameters / 1e6:.1f}M parameters, {self.total_steps} steps; run folder {run_dir}")

    def step_done(self, step: int, step_count: int, loss: float, applied: bool, loss_scale: float) -> None:
        """After every trained batch (`step` as in the metrics line), on every rank."""
        self.last_step, self.last_step_count = step, step_count
        if not self.sends:
            return
        resumed = self._watchdog.beat(step)
        if resumed is not None:
            self._alert(f"Training goes on again: step {step} finished after {format_duration(resumed.idle_s)} "
                        "without a step.")
        if not applied:
            self._alert(f"Warning: skip parameter update at step {step}.\n"
                        f"The gradients were inf or nan (loss {loss}, loss scale {loss_scale}); "
                        f"{step_count} optimizer steps so far.")
            return
        previous, self._previous_loss = self._previous_loss, loss
        if self._first_loss is None:
            self._first_loss = loss
        if previous is not None and loss > self.spike_limit * previous:
            self._alert(f"Checking step by step: Loss spike may be happened in step {step}, loss value from "
                        f"{previous} to {loss}, please check it.")

    def metrics_logged(self, metrics: dict) -> None:
        """After the metrics line (the sending rank, successful steps): the heartbeat and the progress line."""
        if self._heartbeats is not None:
            self._heartbeats.post(heartbeat(metrics))
        line = self._eta.line(self.last_step_count)
        if line:
            logger.info(line)

    def checkpoint_failed(self, error: BaseException | str) -> None:
        """The checkpoint package's failure callback: this rank's part of a save, or one of its uploads, failed."""
        if isinstance(error, BaseException):
            self._alerted_errors.append(error)  # the same error ending the run is not alerted twice
        self._alert(f"Checkpoint failure on rank {self.rank} ({self.host}) after step {self.last_step}: {error}")

    def run_failed(self, error: BaseException) -> None:
        """An exception ends the run on this rank. Only the first failing rank of the run is alerted."""
        if self._alert_url is None or self._closed:
            return
        first = True
        if self._relay is not None:
            first = bounded(self._relay.claim_first_failure, RELAY_STORE_TIMEOUT_S) is not False
        if not first:
            logger.info("monitor: another rank failed first and was alerted; this rank's error is not")
            return
        if any(error is seen for seen in self._alerted_errors):
            return
        where = f"after step {self.last_step}" if self.last_step is not None else "before the first step"
        trace = "".join(traceback.format_exception(error)).rstrip().splitlines()[-TRACEBACK_LINES:]
        self._alert(f"Catch Exception from {self.host} with rank id {self.rank} {where}: "
                    f"{type(error).__name__}: {error}\n" + "\n".join(trace), fatal=True)

    def run_finished(self) -> None:
        """The loop ended without an error: all steps done, or stopped on request (a signal, the stop file)."""
        if self._alerts is None:
            return
        losses = "" if self._first_loss is None else f", loss {self._first_loss:.4f} -> {self._previous_loss:.4f}"
        if self.last_step_count >= self.total_steps:
            head = f"Training in {self.host} completed."
        else:
            head = f"Training in {self.host} stopped on request after {self.last_step_count} of {self.total_steps} " \
                   "steps."
        self._alert(f"{head}\n{self.last_step_count} steps in {format_duration(time.monotonic() - self._started)}"
                    f"{losses}.")

    def close(self) -> None:
        """Stop the threads and deliver what is queued (a few seconds at most)."""
        if self._closed:
            return
        self._closed = True
        for ticker in self._tickers:
            ticker.stop()
        deadline = time.monotonic() + CLOSE_TIMEOUT_S  # for all endpoints together
        for sender in (self._alerts, self._heartbeats):
            if sender is not None:
                sender.close(max(deadline - time.monotonic(), 0.0))

    # ------------------------------------------------------------------------------------ sending

    def _alert(self, text: str, fatal: bool = False) -> None:
        """Post from the sending rank; from another rank, relay to it. A `fatal` alert (the run ends) stops the
        stuck watchdog (the other ranks now wait for the failed one), and is made sure to go out before this rank
        exits."""
        if self._alert_url is None:
            return
        text = text if len(text) <= MAX_TEXT else text[:MAX_TEXT - 20] + "\n… (cut)"
        if self._alerts is not None:
            if fatal:
                self._stop_watchdog()
            self._alerts.post(alert_body(self.format, self.title, text))
            return
        number = bounded(lambda: self._relay.publish(text, fatal), RELAY_STORE_TIMEOUT_S) if self._relay else None
        if number is not None and not fatal:
            return
        deadline = time.monotonic() + RELAY_DELIVERY_TIMEOUT_S
        while number is not None and time.monotonic() < deadline:
            if bounded(lambda: self._relay.delivered(number), RELAY_STORE_TIMEOUT_S):
                return
            time.sleep(0.2)
        # The sending rank did not take it (gone, or no store): post it from here.
        sender = WebhookSender(self._alert_url, f"the {self.format} alert webhook", self._user_agent)
        sender.post(alert_body(self.format, self.title, text))
        sender.close()

    def _forward_relayed(self) -> None:
        for number, text, fatal in self._relay.take_new():
            if fatal:
                self._stop_watchdog()
            self._alerts.post(alert_body(self.format, self.title, text),
                              on_done=lambda _, n=number: bounded(lambda: self._relay.mark_delivered(n),
                                                                  RELAY_STORE_TIMEOUT_S))

    def _stop_watchdog(self) -> None:
        if self._watchdog_ticker is not None:
            self._watchdog_ticker.stop()

    def _check_stuck(self) -> None:
        event = self._watchdog.check()
        if event is not None:
            since = f"step {event.last_step}" if event.last_step is not None else "the start"
            self._alert(f"Training may be in stuck status, please check it.\n"
                        f"No step finished for {format_duration(event.idle_s)} since {since} "
                        f"(stuck_timeout {self._watchdog.timeout_s:g} s).")
