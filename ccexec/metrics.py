"""Prometheus exposition of the pool's state, rendered by any handler.

The broker sees every job and every handler's connection count, so its
statistics (refreshed with each heartbeat) are the one source of truth for
the whole multi-process pool; a handler only renders them.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST as CONTENT_TYPE

__all__ = ["CONTENT_TYPE", "render"]


class _StatsCollector:
    def __init__(self, stats: dict, local_connections: int):
        self.stats = stats
        self.local_connections = local_connections

    def collect(self):
        jobs = CounterMetricFamily("ccexec_jobs", "Jobs finished, by reason", labels=["reason"])
        for reason, count in sorted(self.stats.get("jobs_total", {}).items()):
            jobs.add_metric([reason], count)
        yield jobs
        gauges = [
            ("ccexec_jobs_running", "Jobs running now", "running"),
            ("ccexec_jobs_queued", "Jobs waiting for capacity or their predecessor", "queued"),
            ("ccexec_connections", "Open WebSocket connections over all handlers", "connections"),
            ("ccexec_executors_ready", "Executor processes registered with the broker", "executors_ready"),
            ("ccexec_capacity", "Jobs the executors can run at once", "capacity"),
        ]
        for name, doc, key in gauges:
            yield GaugeMetricFamily(name, doc, value=self.stats.get(key, 0))
        yield GaugeMetricFamily("ccexec_handler_connections", "Open connections on the handler that answered",
                                value=self.local_connections)


def render(stats: dict, local_connections: int) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StatsCollector(stats, local_connections))
    return generate_latest(registry)
