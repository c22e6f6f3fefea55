"""Every metric the pools' request router records, declared in one place.

The router (services/pools/prefix_router.py) runs in the CALLER's process, inside each
Serve handle to a pool: a gateway replica, a batch worker, a benchmark driver. Its metrics
go out through Ray's metrics agent like the gateway's (services/inference/metrics.py), with
Serve's `deployment`/`replica` tags of that caller when it is a replica.

Labels are bounded: `pool` is a catalog pool name, `route` one of `ROUTES`.
"""

from __future__ import annotations

import logging
from typing import Literal

from ray.serve import metrics

logger = logging.getLogger(__name__)

Route = Literal["affinity", "fallback", "spread"]
# affinity: went to a replica holding the longest known prefix of the prompt (same tenant);
# fallback: such a replica was busier than the least-loaded one by more than the load bound;
# spread: no known prefix, placed by rendezvous hashing of the prompt's first block.
ROUTES: tuple[Route, ...] = ("affinity", "fallback", "spread")


class PoolRoutingMetrics:
    """Counts routing decisions. Recording never raises: a metrics failure (no Ray worker,
    an agent that went away) must never break routing, so it is logged once and dropped."""

    def __init__(self) -> None:
        self._failed = False
        self._routed: metrics.Counter | None = None
        try:
            self._routed = metrics.Counter(
                "phiserve_pool_routed_total",
                description="Requests routed to a pool replica by the prefix-affinity router, "
                "by route (affinity, fallback, spread).",
                tag_keys=("pool", "route"),  # type: ignore[arg-type]  # Ray annotates Tuple[str]
            )
        except Exception as exc:  # noqa: BLE001 - metrics must never break routing
            self._note_failure("declare", exc)

    def routed(self, pool: str, route: Route) -> None:
        if self._routed is None:
            return
        try:
            self._routed.inc(tags={"pool": pool, "route": route})
        except Exception as exc:  # noqa: BLE001 - metrics must never break routing
            self._note_failure("record", exc)

    def _note_failure(self, what: str, exc: Exception) -> None:
        if not self._failed:  # once: a broken agent would otherwise log on every request
            self._failed = True
            logger.warning("could not %s phiserve_pool_routed_total (%r); routing goes on", what, exc)
