"""What goes over the wire: InternEvo's Feishu post, a Slack-compatible text, and the light-monitor heartbeat.

The formats are InternEvo's (internlm/monitor/alert.py: send_feishu_msg_with_webhook, send_heartbeat), so receivers
set up for InternEvo runs accept evods runs unchanged.
"""
import math
import os
import re
import time


def job_title(job_name: str, environ=os.environ) -> str:
    """InternEvo's default title, "{job id}_{job name}" (internlm/monitor/utils.py: get_job_key): the scheduler's job
    id (slurm, then Kubernetes, then Volcano ML platform), else "none"."""
    if environ.get("SLURM_JOB_ID"):
        job_id = environ["SLURM_JOB_ID"]
    elif environ.get("KUBERNETES_POD_NAME"):
        job_id = environ["KUBERNETES_POD_NAME"].split("-")[0]
    elif environ.get("MLP_TASK_INSTANCE_ID"):
        job_id = environ.get("MLP_TASK_ID", "none")
    else:
        job_id = "none"
    return f"{job_id}_{environ.get('JOB_NAME') or job_name}"


def feishu_post(title: str, text: str, now: float | None = None) -> dict:
    """A Feishu bot "post" message: one paragraph of plain text under a title."""
    return {
        "timestamp": int(time.time() if now is None else now),
        "msg_type": "post",
        "content": {"post": {"zh_cn": {"title": title, "content": [[{"tag": "text", "text": text}]]}}},
    }


def slack_text(title: str, text: str) -> dict:
    """A Slack incoming-webhook message (also accepted by Mattermost, Rocket.Chat and Discord's /slack endpoint)."""
    return {"text": f"*{title}*\n{text}"}


def alert_body(webhook_format: str, title: str, text: str) -> dict:
    return feishu_post(title, text) if webhook_format == "feishu" else slack_text(title, text)


def _heartbeat_key(key: str) -> str:
    return re.sub(r"[^a-zA-Z0-9_]", "_", key.split(" ")[0])


def _finite_or_none(value):
    # InternEvo turns NaN into null; evods does the same for ±inf, which JSON cannot carry either.
    return None if isinstance(value, float) and not math.isfinite(value) else value


def heartbeat(metrics: dict, msg_type: str = "train_metrics", environ=os.environ) -> dict:
    """The metrics line as InternEvo's light-monitor heartbeat: keys cut at the first space with other characters
    than [A-Za-z0-9_] made "_" ("tgs (tokens/gpu/second)" -> "tgs", "loss/en" -> "loss_en"), dict values flattened
    to "{key}_{inner key}", NaN (and inf) as null, plus the cluster ($CLUSTER_NAME) and the message type."""
    data = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            for inner, inner_value in value.items():
                data[_heartbeat_key(f"{key}_{inner}")] = _finite_or_none(inner_value)
        else:
            data[_heartbeat_key(key)] = _finite_or_none(value)
    if environ.get("CLUSTER_NAME"):
        data["cluster"] = environ["CLUSTER_NAME"]
    data["msg_type"] = msg_type
    return data
