"""Batch metrics, declared in one place (exported through Ray's metrics agent, `ray_` prefix)."""

from __future__ import annotations

from ray.serve import metrics

BATCH_DURATION_BUCKETS_S: list[float] = [1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600, 24 * 3600]


class BatchMetrics:
    def __init__(self) -> None:
        self.queue_depth = metrics.Gauge(
            "phiserve_batch_queue_depth",
            description="Batch items in the pool's stream not yet acknowledged.",
            tag_keys=("pool",),
        )
        self.queue_lag = metrics.Gauge(
            "phiserve_batch_queue_lag_seconds",
            description="Age of the oldest unacknowledged batch item of the pool.",
            tag_keys=("pool",),
        )
        self.items = metrics.Counter(
            "phiserve_batch_items_total",
            description="Batch items by outcome: completed, failed, retried, reclaimed, dead_lettered.",
            tag_keys=("outcome",),
        )
        self.batch_duration = metrics.Histogram(
            "phiserve_batch_duration_seconds",
            description="Time from batch creation to its final status.",
            boundaries=BATCH_DURATION_BUCKETS_S,
            tag_keys=("status",),
        )
