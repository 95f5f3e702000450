"""Alerts and heartbeats of real runs, received by a real HTTP server on 127.0.0.1 (issue: watching a run)."""
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

from testkit.paths import REPO
from testkit.webhook_server import JOB_ENV, webhook_server

SECRET_PATH = "/open-apis/bot/v2/hook/3f1c-secret-token"
HEARTBEAT_PATH = "/light-monitor/metrics"
JOB = "alert_test"


def config_file(folder: Path, alert: str, data: str = "total_steps=20", monitor: str = "") -> Path:
    path = folder / "alert_config.py"
    path.write_text(f'exec(open({str(REPO / "configs" / "demo_cpu.py")!r}).read())\n'
                    f'JOB_NAME = {JOB!r}\n'
                    'model.update(hidden_size=64, num_layers=2, num_attention_heads=4, vocab_size=512)\n'
                    f'data.update(seq_len=64, {data})\n'
                    'lr_scheduler.update(total_steps=data["total_steps"])\n'
                    'ckpt.update(enable_save_ckpt=False)\n'
                    f'monitor = dict(alert=dict({alert}){monitor})\n')
    return path


def clean_env(**extra) -> dict:
    env = {key: value for key, value in os.environ.items() if key not in JOB_ENV}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def alert_text(post) -> str:
    return post.body["content"]["post"]["zh_cn"]["content"][0][0]["text"]


def test_a_two_rank_run_alerts_spike_skip_hang_and_exception_from_one_rank(tmp_path):
    # rank 1 hangs 7 s in step 6 (the other rank waits for it in a collective); stuck_timeout is 4 s
    faults = ('{"spike_at": 3, "inf_at": 4, "hang_at": 6, "hang_rank": 1, "hang_s": 7, '
              '"raise_at": 8, "raise_rank": 1}')
    with webhook_server() as server:
        config = config_file(tmp_path, f"enable_feishu_alert=True, feishu_alert_address={server.url(SECRET_PATH)!r}, "
                                       f"light_monitor_address={server.url(HEARTBEAT_PATH)!r}, stuck_timeout=4",
                             monitor=", log_every=5")
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             "testkit/faulty_training.py", "--config", str(config), "--launcher", "torch",
             "--run_dir", str(tmp_path / "run")],
            cwd=REPO, capture_output=True, text=True, timeout=300,
            env=clean_env(EVODS_TEST_FAULTS=faults, CLUSTER_NAME="test-cluster"))
        elapsed = time.monotonic() - started
        alerts, beats = server.posts(SECRET_PATH), server.posts(HEARTBEAT_PATH)
    output = result.stdout + result.stderr
    print(f"run took {elapsed:.1f} s")
    for post in alerts:
        print(post.headers["User-Agent"], post.body["timestamp"], alert_text(post))

    # the exception still ends the run, and its traceback is in the log as before
    assert result.returncode != 0
    assert "RuntimeError: provoked failure on rank 1 in step 8" in output
    # the webhook URL (and its token) appears nowhere in what the run printed
    assert "secret-token" not in output and SECRET_PATH not in output

    host = socket.gethostname()
    # one rank sent everything: the log rank (rank 0), also the alert about rank 1's exception
    assert {post.headers["User-Agent"] for post in alerts + beats} == {f"evods (rank 0, {host})"}
    for post in alerts:  # InternEvo's Feishu post, JSON in UTF-8
        assert post.headers["Content-Type"] == "application/json;charset=utf-8"
        assert set(post.body) == {"timestamp", "msg_type", "content"} and post.body["msg_type"] == "post"
        assert abs(post.body["timestamp"] - time.time()) < 600
        assert post.body["content"]["post"]["zh_cn"]["title"] == f"none_{JOB}"
        assert post.body["content"]["post"]["zh_cn"]["content"][0][0]["tag"] == "text"
    texts = [alert_text(post) for post in alerts]
    assert len(texts) == 6, texts
    starting, spike, skipped, stuck, going, exception = texts
    assert starting.startswith(f"Training in {host} is starting.") and "2 ranks (data 2 × pipeline 1 × tensor 1)" in \
        starting and "20 steps" in starting
    assert re.match(r"Checking step by step: Loss spike may be happened in step 3, loss value from [\d.]+ to [\d.]+",
                    spike)
    assert skipped.startswith("Warning: skip parameter update at step 4.")
    assert stuck.startswith("Training may be in stuck status, please check it.") and "since step 5" in stuck
    assert going.startswith("Training goes on again: step 6 finished after")
    assert exception.startswith(f"Catch Exception from {host} with rank id 1 after step 7: "
                                "RuntimeError: provoked failure on rank 1 in step 8")
    assert "faulty_training.py" in exception  # the end of the traceback
    assert "completed" not in " ".join(texts)  # a failed run is not reported as completed

    # a heartbeat per metrics line, with InternEvo's key normalisation
    logged_steps = [int(step) for step in re.findall(r"tflops=[^,]+,step=(\d+),", output)]
    assert logged_steps == [0, 1, 2, 3, 5, 6, 7]
    assert [beat.body["step"] for beat in beats] == logged_steps
    beat = beats[0].body
    assert beat["msg_type"] == "train_metrics" and beat["cluster"] == "test-cluster"
    assert "tgs" in beat and "loss_en" in beat and not any(" " in key or "/" in key for key in beat)
    # the progress line: at step 1 and every log_every=5 steps, beside the unchanged metrics line
    assert re.search(r"progress: step 1/20 \(5\.0%\), elapsed [\d:]+, left ~[\d:]+ at [\d.]+ s/step", output)
    assert "progress: step 5/20 (25.0%)" in output
