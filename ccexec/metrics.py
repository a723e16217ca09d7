"""Prometheus metrics of the whole pool, kept by the broker.

The broker sees every job and hears every handler's connection count and
every process exit (Circus's event stream), so it is the one place where
pool-wide counters and histograms are right. It renders the exposition with
each heartbeat; any handler serves the latest copy at /metrics.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST as CONTENT_TYPE

__all__ = ["CONTENT_TYPE", "PoolMetrics"]

# Seconds: from an `echo` to a long Claude run.
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 1800, 3600, 7200)
GAUGES = {  # name: (help, key in the broker's stats)
    "ccexec_jobs_running": ("Jobs running now", "running"),
    "ccexec_jobs_queued": ("Jobs waiting for capacity or for their predecessor", "queued"),
    "ccexec_connections": ("Open WebSocket connections over all handlers", "connections"),
    "ccexec_executors_ready": ("Executor processes registered with the broker", "executors_ready"),
    "ccexec_capacity": ("Jobs the executors can run at once", "capacity"),
}


class PoolMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.jobs = Counter("ccexec_jobs", "Jobs finished, by reason", ["reason"], registry=r)
        self.queue_wait = Histogram("ccexec_job_queue_wait_seconds", "Time from accepted to started",
                                    buckets=DURATION_BUCKETS, registry=r)
        self.run_time = Histogram("ccexec_job_run_seconds", "Time from started to finished",
                                  buckets=DURATION_BUCKETS, registry=r)
        self.output = Counter("ccexec_output_bytes", "Bytes jobs wrote, by stream", ["stream"], registry=r)
        self.restarts = Counter("ccexec_watcher_restarts", "Processes that exited (and were respawned), by watcher",
                                ["watcher"], registry=r)
        self.gauges = {name: Gauge(name, doc, registry=r) for name, (doc, _) in GAUGES.items()}

    def job_started(self, queue_wait: float) -> None:
        self.queue_wait.observe(max(0.0, queue_wait))

    def job_finished(self, completed: dict) -> None:
        self.jobs.labels(completed.get("reason", "exit")).inc()
        if completed.get("pid") is not None:
            self.run_time.observe(max(0.0, float(completed.get("execution_time") or 0.0)))
        for stream in ("stdout", "stderr"):
            self.output.labels(stream).inc(completed.get(f"{stream}_bytes") or 0)

    def watcher_exited(self, watcher: str) -> None:
        self.restarts.labels(watcher).inc()

    def render(self, stats: dict) -> str:
        for name, (_, key) in GAUGES.items():
            self.gauges[name].set(stats.get(key, 0))
        return generate_latest(self.registry).decode()
