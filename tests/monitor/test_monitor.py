"""The monitor's parts: payload formats, the watchdog, the progress line, checkpoint-failure and Slack alerts, and
endpoints that are down or slow during a real run (issue: watching a run)."""
import logging
import math
import time
from pathlib import Path

from evods.config import AlertConfig
from evods.monitor import RunMonitor, feishu_post, heartbeat, job_title, slack_text
from evods.monitor.eta import TrainingEta
from evods.monitor.sender import WebhookSender
from evods.monitor.watchdog import StuckWatchdog
from evods.storage import AsyncUploader, LocalStorage
from testkit.distributed import free_port, run_distributed
from testkit.train_configs import tiny_config
from testkit.webhook_server import JOB_ENV, webhook_server


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_feishu_slack_and_heartbeat_bodies_are_internevos():
    assert feishu_post("7_job", "Training in host is starting.", now=1700000000.7) == {
        "timestamp": 1700000000, "msg_type": "post",
        "content": {"post": {"zh_cn": {"title": "7_job", "content": [[{"tag": "text",
                                                                         "text": "Training in host is starting."}]]}}}}
    assert slack_text("7_job", "stuck") == {"text": "*7_job*\nstuck"}
    body = heartbeat({"tflops": 1.5, "tgs (tokens/gpu/second)": 120.0, "loss/en": 2.0, "loss": math.nan,
                      "grad_norm": math.inf, "norms": {"layer 0": 1.0}},
                     environ={"CLUSTER_NAME": "c1"})
    assert body == {"tflops": 1.5, "tgs": 120.0, "loss_en": 2.0, "loss": None, "grad_norm": None, "norms_layer": 1.0,
                    "cluster": "c1", "msg_type": "train_metrics"}
    assert job_title("demo", environ={}) == "none_demo"
    assert job_title("demo", environ={"SLURM_JOB_ID": "42", "JOB_NAME": "from_env"}) == "42_from_env"
    assert job_title("demo", environ={"KUBERNETES_POD_NAME": "abc-worker-0"}) == "abc_demo"


def test_watchdog_alerts_once_per_hang_and_once_when_steps_resume():
    clock = FakeClock()
    watchdog = StuckWatchdog(timeout_s=60, clock=clock)
    events = []
    for step in range(5):  # steps every 10 s: never stuck
        clock.now += 10
        events += [watchdog.beat(step), watchdog.check()]
    for _ in range(20):  # a 200 s hang, checked every 10 s
        clock.now += 10
        events.append(watchdog.check())
    events += [watchdog.beat(5), watchdog.check()]
    clock.now += 10
    events += [watchdog.beat(6), watchdog.check()]
    fired = [event for event in events if event is not None]
    assert [(event.stuck, event.idle_s, event.last_step) for event in fired] == [(True, 60, 4), (False, 200, 5)]


def test_progress_line_at_the_first_step_and_every_n_steps():
    clock = FakeClock()
    eta = TrainingEta(total_steps=1000, every=50, clock=clock)
    lines = {}
    for step in range(1, 101):
        clock.now += 2.0 if step <= 50 else 4.0  # the recent rate is what counts
        lines[step] = eta.line(step)
    assert [step for step, line in lines.items() if line] == [1, 50, 100]
    assert lines[1] == "progress: step 1/1000 (0.1%), elapsed 0:00:02, left ~0:33:18 at 2.00 s/step"
    assert lines[100] == "progress: step 100/1000 (10.0%), elapsed 0:05:00, left ~1:00:00 at 4.00 s/step"


def one_rank_monitor(url: str, **alert) -> RunMonitor:
    config = AlertConfig(enable_feishu_alert=True, feishu_alert_address=url, **alert)
    return RunMonitor(config, job_name="unit", rank=0, sends=True, total_steps=10, log_every=5)


def test_a_failed_background_upload_is_alerted_while_the_run_goes_on(tmp_path):
    blocked = tmp_path / "not_a_folder"
    blocked.write_text("a file where the checkpoint folder should be")
    with webhook_server() as server:
        monitor = one_rank_monitor(server.url("/hook"))
        uploader = AsyncUploader(LocalStorage(str(blocked)), tmp_path / "tmp", attempts=2, retry_backoff_s=0.01,
                                 on_failure=lambda failed: monitor.checkpoint_failed(f"background upload of {failed}"))
        staged = uploader.temp_path("model_states.pt")
        Path(staged).write_bytes(b"weights")
        uploader.submit(staged, "10/model_states.pt")
        deadline = time.monotonic() + 30
        while not server.posts() and time.monotonic() < deadline:  # the alert comes before anyone waits
            time.sleep(0.05)
        monitor.close()
        posts = server.posts()
    assert len(posts) == 1
    text = posts[0].body["content"]["post"]["zh_cn"]["content"][0][0]["text"]
    assert text.startswith("Checkpoint failure on rank 0") and "10/model_states.pt: failed after 2 attempts" in text
    assert "the data is kept at" in text


def test_slack_format_sends_text_bodies(tmp_path, monkeypatch):
    for name in JOB_ENV:
        monkeypatch.delenv(name, raising=False)
    with webhook_server() as server:
        monitor = one_rank_monitor(server.url("/slack"), webhook_format="slack")
        monitor.run_started(dp=1, pp=1, tp=1, parameters=1e6, run_dir=tmp_path)
        monitor.step_done(0, 1, 2.0, True, 1.0)
        monitor.step_done(1, 2, 3.5, True, 1.0)  # 3.5 > 1.5 × 2.0
        monitor.run_finished()
        monitor.close()
        bodies = [post.body for post in server.posts()]
    assert all(set(body) == {"text"} for body in bodies)
    started, spike, finished = [body["text"] for body in bodies]
    assert started.startswith("*none_unit*\nTraining in ") and "is starting." in started
    assert spike.startswith("*none_unit*\nChecking step by step: Loss spike may be happened in step 1, loss value "
                            "from 2.0 to 3.5")
    assert "stopped on request after 2 of 10 steps" in finished and "loss 2.0000 -> 3.5000" in finished


def test_a_refusal_by_feishu_is_a_failure_and_warns_once(caplog):
    refusal = {"code": 19024, "msg": "Key Words Not Found"}  # a bot that only takes messages with a keyword
    with webhook_server(answer=refusal) as server, caplog.at_level(logging.INFO, logger="evods.monitor"):
        sender = WebhookSender(server.url("/hook/refusing-secret"), "the feishu alert webhook", "evods (test)")
        for text in ("one", "two", "three"):
            sender.post(feishu_post("title", text))
        sender.close()
    assert len(server.posts()) == 3 and (sender.delivered, sender.failed) == (0, 3)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1 and "the endpoint answered code 19024: Key Words Not Found" in warnings[0]
    assert "refusing-secret" not in caplog.text
    assert "3 messages to the feishu alert webhook were not delivered (3 failed" in caplog.text


def train_with_endpoints(variants: list[tuple[str, str | None]], run_dir: str) -> dict:
    """Each variant trains the same tiny model for 20 steps with its alert and heartbeat endpoint (None: no alerts);
    returns per variant the mean time of a step (the monitor's hooks included) and the monitor's warnings."""
    from evods.training.distributed import init_distributed
    from evods.training.trainer import Trainer

    init_distributed("torch")
    warnings = []

    class Collect(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    logging.getLogger("evods.monitor").addHandler(Collect(level=logging.WARNING))
    results = {}
    for name, url in variants:
        cfg = tiny_config(data=dict(seq_len=32, micro_bsz=1, micro_num=1, total_steps=20),
                          lr_scheduler=dict(total_steps=20),
                          monitor=dict(alert=dict(enable_feishu_alert=url is not None, feishu_alert_address=url,
                                                  light_monitor_address=url)))
        trainer = Trainer(cfg, run_dir=Path(run_dir) / name)
        started = time.perf_counter()
        trainer.train()
        step_s = (time.perf_counter() - started) / 20
        trainer.close()
        results[name] = {"step_s": step_s, "warnings": list(warnings)}
        warnings.clear()
    return results


def test_a_down_or_slow_endpoint_neither_slows_nor_fails_the_run(tmp_path):
    down = f"http://127.0.0.1:{free_port()}/hook/down-secret"  # nothing listens there
    with webhook_server(delay_s=10) as slow_server:
        slow = slow_server.url("/hook/slow-secret")
        results = run_distributed(train_with_endpoints, world=1, args=(
            [("down", down), ("quiet", None), ("slow", slow)], str(tmp_path)))[0]
    baseline = results["quiet"]["step_s"]
    for name in ("down", "slow"):
        # one request to the slow server takes 5 s (its timeout): a step that waited for one would show it
        assert results[name]["step_s"] < 2 * baseline + 0.25, results
        warnings = results[name]["warnings"]
        # one warning per endpoint (the alert webhook, the heartbeat endpoint), naming it but never its URL
        assert len(warnings) == 2, warnings
        assert any("alert webhook" in w for w in warnings) and any("light-monitor" in w for w in warnings)
        assert not any("secret" in w or "127.0.0.1" in w for w in warnings), warnings
    assert results["quiet"]["warnings"] == []
