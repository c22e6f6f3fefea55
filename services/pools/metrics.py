"""Every metric the pools record, declared in one place: the request router's and the
replicas' LoRA adapter cache's (issue 14).

The router (services/pools/prefix_router.py) runs in the CALLER's process, inside each
Serve handle to a pool: a gateway replica, a batch worker, a benchmark driver. Its metrics
go out through Ray's metrics agent like the gateway's (services/inference/metrics.py), with
Serve's `deployment`/`replica` tags of that caller when it is a replica.

The adapter metrics are recorded in the pool replica itself (services/pools/adapter_cache.py)
and carry Serve's `replica` tag there.

Labels are bounded: `pool` is a catalog pool name, `route` one of `ROUTES`. Never an adapter id:
tenants register them, so their number has no bound.
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


class AdapterMetrics:
    """A replica's LoRA adapter cache: loads, failed loads (the adapter's files were refused),
    evictions (least recently used, Serve's multiplexer) and the adapters its engine holds.
    Recording never raises, as for `PoolRoutingMetrics`."""

    def __init__(self) -> None:
        self._failed = False
        self._counters: dict[str, metrics.Counter] = {}
        self._resident: metrics.Gauge | None = None
        tags = ("pool",)
        try:
            for event, description in (
                (
                    "loads",
                    "LoRA adapters loaded into a pool replica's cache (a miss: first use or after eviction).",
                ),
                ("load_failures", "LoRA adapters refused when loading (invalid files): a 400 each."),
                ("evictions", "LoRA adapters evicted from a pool replica, least recently used first."),
            ):
                self._counters[event] = metrics.Counter(
                    f"phiserve_adapter_{event}_total",
                    description=description,
                    tag_keys=tags,
                )
            self._resident = metrics.Gauge(
                "phiserve_adapters_loaded",
                description="LoRA adapters a pool replica's engine holds now.",
                tag_keys=tags,
            )
        except Exception as exc:  # noqa: BLE001 - metrics must never break serving
            self._note_failure("declare", exc)

    def loaded(self, pool: str) -> None:
        self._inc("loads", pool)

    def load_failed(self, pool: str) -> None:
        self._inc("load_failures", pool)

    def evicted(self, pool: str) -> None:
        self._inc("evictions", pool)

    def resident(self, pool: str, count: int) -> None:
        if self._resident is None:
            return
        try:
            self._resident.set(count, tags={"pool": pool})
        except Exception as exc:  # noqa: BLE001 - metrics must never break serving
            self._note_failure("record", exc)

    def _inc(self, event: str, pool: str) -> None:
        counter = self._counters.get(event)
        if counter is None:
            return
        try:
            counter.inc(tags={"pool": pool})
        except Exception as exc:  # noqa: BLE001 - metrics must never break serving
            self._note_failure("record", exc)

    def _note_failure(self, what: str, exc: Exception) -> None:
        if not self._failed:
            self._failed = True
            logger.warning("could not %s the adapter metrics (%r); serving goes on", what, exc)
