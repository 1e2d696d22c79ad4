"""The /metrics exposition: every process's counters merged, plus gauges read from shared state."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from app import operations
from app.metrics import host_counters


class SharedStateCollector:
    """Gauges that must be the same whichever process is scraped: read at scrape time. A service out of
    reach leaves its gauges out (an alert on them goes stale, not to zero) and says so in
    `agentq_backing_service_up`."""

    def collect(self) -> Iterator[Metric]:
        snapshot = operations.scrape_snapshot()
        reachable = GaugeMetricFamily("agentq_backing_service_up",
                                      "Whether this scrape could read the service (1) or not (0).", labels=["service"])
        reachable.add_metric(["database"], 0 if snapshot.database_error else 1)
        reachable.add_metric(["redis"], 0 if snapshot.redis_error else 1)
        yield reachable
        if snapshot.database_error is None:
            in_flight = GaugeMetricFamily("agentq_turns_in_flight", "Turns pending or processing.", labels=["status"])
            for status, count in snapshot.turns_by_status.items():
                in_flight.add_metric([status], count)
            yield in_flight
        depth = GaugeMetricFamily("agentq_queue_depth", "Messages in a queue.", labels=["queue", "state"])
        for queue in snapshot.queues:
            for state, messages in (("ready", queue.ready), ("delayed", queue.delayed)):
                if messages is not None:
                    depth.add_metric([queue.name, state], messages)
        yield depth
        if snapshot.redis_error is None:
            workers = GaugeMetricFamily("agentq_worker_processes", "Worker processes alive, by what they do.",
                                        labels=["state"])
            for state, processes in snapshot.worker_processes.items():
                workers.add_metric([state], processes)
            yield workers
        dead = GaugeMetricFamily("agentq_dead_letters", "Messages in a dead-letter queue.", labels=["queue"])
        for queue in snapshot.queues:
            if queue.dead is not None:
                dead.add_metric([queue.name], queue.dead)
        yield dead


def exposition() -> tuple[bytes, str]:
    registry = host_counters()
    registry.register(SharedStateCollector())
    return generate_latest(registry), CONTENT_TYPE_LATEST
