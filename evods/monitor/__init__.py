"""Watching a run: InternEvo's Feishu alerts and light-monitor heartbeat, the stuck watchdog, the progress (ETA) line,
the profiler switch and loss-curve pictures.

    monitor = RunMonitor.for_run(cfg, rank, world)   # one rank sends; the others relay their failures to it
    monitor.run_started(dp=..., pp=..., tp=..., parameters=..., run_dir=...)
    monitor.step_done(step, step_count, loss, applied, loss_scale)   # every trained batch, every rank
    monitor.metrics_logged(metrics)                  # after the metrics line: heartbeat, progress line
    monitor.checkpoint_failed(error)                 # the checkpoint manager's failure callback
    monitor.run_failed(error) / monitor.run_finished()
    monitor.close()

    payloads.py     InternEvo's Feishu post, a Slack-compatible text, the heartbeat's key normalisation
    sender.py       background POSTs: bounded queue, timeouts, one warning per endpoint, URLs never logged
    relay.py        other ranks' failures to the sending rank through the process group's store
    watchdog.py     no step for stuck_timeout seconds: one alert per episode
    eta.py          the progress line: steps done / total, elapsed, time left
    run_monitor.py  the hooks above
    profiler.py     train_ds.py --profiling: a torch profiler trace of a few steps
    plot.py         metrics.jsonl of runs as one PNG (tools/plot_metrics.py)
"""
from .payloads import alert_body, feishu_post, heartbeat, job_title, slack_text
from .plot import PlotError, plot_runs
from .profiler import StepProfiler
from .run_monitor import RunMonitor

__all__ = ["PlotError", "RunMonitor", "StepProfiler", "alert_body", "feishu_post", "heartbeat",
           "job_title", "plot_runs", "slack_text"]
