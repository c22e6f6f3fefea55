"""Scale batch workers by stream lag (a Ray Serve custom autoscaling policy).

Each worker reports the items waiting in the pool streams (`record_autoscaling_stats`);
the controller calls `BacklogPolicy` with those numbers and sizes the deployment to one
worker per `items_per_worker` waiting items. Serve then applies min/max replicas and the
up/downscale delays of the deployment's autoscaling config.
"""

from __future__ import annotations

import math
from typing import Any

BACKLOG_METRIC = "batch_backlog"


class BacklogPolicy:
    def __init__(self, items_per_worker: int) -> None:
        self._items_per_worker = max(1, int(items_per_worker))

    def __call__(self, ctx: Any) -> tuple[int, dict[str, Any]]:
        reports = (ctx.aggregated_metrics or {}).get(BACKLOG_METRIC, {})
        # Every worker sees the same streams: take the freshest (largest) view.
        backlog = max(reports.values(), default=0.0)
        if not reports:
            return ctx.current_num_replicas, {}
        return max(1, math.ceil(backlog / self._items_per_worker)), {"backlog": backlog}
