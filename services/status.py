"""`phiserve status`: pools and their replicas (Serve), queue depth (the fair queue in Redis)
and the progress of active batches (Redis), read from a running cluster.

The caller connects to Ray first (`ray.init`); Redis is reached through `settings.redis_url`.
Everything here only reads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from services.catalog.models import Catalog
from services.redis_store import RedisStore, keys, text_hash, texts
from services.settings import Settings


@dataclass(frozen=True)
class PoolStatus:
    name: str
    deployment_status: str  # Serve's: HEALTHY, UPDATING, UNHEALTHY, ... or NOT_DEPLOYED
    replicas: dict[str, int]  # replica state -> count (RUNNING, STARTING, ...)
    in_flight: int  # fair-queue grants whose lease is live
    waiting: int  # fair-queue tickets waiting for a grant


@dataclass(frozen=True)
class BatchProgress:
    id: str
    tenant_id: str
    status: str
    total: int
    completed: int
    failed: int


@dataclass(frozen=True)
class ClusterStatus:
    app_status: str
    pools: list[PoolStatus]
    other_deployments: dict[str, dict[str, int]] = field(default_factory=dict)
    batches: list[BatchProgress] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"application: {self.app_status}", "pools:"]
        for p in self.pools:
            replicas = ", ".join(f"{n} {state.lower()}" for state, n in sorted(p.replicas.items())) or "none"
            out.append(
                f"  {p.name}: {p.deployment_status.lower()}, replicas {replicas}; "
                f"queue: {p.in_flight} in flight, {p.waiting} waiting"
            )
        for name, states in sorted(self.other_deployments.items()):
            counts = ", ".join(f"{n} {state.lower()}" for state, n in sorted(states.items())) or "none"
            out.append(f"{name}: replicas {counts}")
        out.append(f"active batches: {len(self.batches)}")
        for b in self.batches:
            done = b.completed + b.failed
            out.append(
                f"  {b.id} ({b.tenant_id}): {b.status}, {done}/{b.total} done "
                f"({b.completed} completed, {b.failed} failed)"
            )
        return out


def serve_deployments(app_name: str) -> tuple[str, dict[str, tuple[str, dict[str, int]]]]:
    """The application's status and, per deployment, (status, replica state -> count)."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return "NOT_DEPLOYED", {}
    return str(_value(app.status)), {
        name: (str(_value(dep.status)), {str(_value(s)): int(n) for s, n in dep.replica_states.items()})
        for name, dep in app.deployments.items()
    }


async def collect_status(
    catalog: Catalog,
    state: RedisStore,
    app_status: str,
    deployments: dict[str, tuple[str, dict[str, int]]],
) -> ClusterStatus:
    from services.app import pool_deployment_name

    redis = state.redis
    now_ms = int(time.time() * 1000)
    pools = []
    for pool in catalog.enabled_pools:
        status, replicas = deployments.get(pool_deployment_name(pool), ("NOT_DEPLOYED", {}))
        in_flight = await redis.zcount(keys.pool_in_flight(pool.name), now_ms, "+inf")
        waiting = await redis.zcard(keys.pool_waiting(pool.name))
        pools.append(PoolStatus(pool.name, status, replicas, int(in_flight), int(waiting)))
    pool_names = {pool_deployment_name(pool) for pool in catalog.enabled_pools}
    others = {name: replicas for name, (_, replicas) in deployments.items() if name not in pool_names}
    batches = []
    for batch_id in texts(sorted(await redis.smembers(keys.ACTIVE_BATCHES))):
        raw = text_hash(await redis.hgetall(keys.batch_record(batch_id)))
        if raw:
            batches.append(
                BatchProgress(
                    id=batch_id,
                    tenant_id=str(raw.get("tenant_id", "")),
                    status=str(raw.get("status", "")),
                    total=int(raw.get("total", 0)),
                    completed=int(raw.get("completed", 0)),
                    failed=int(raw.get("failed", 0)),
                )
            )
    return ClusterStatus(app_status, pools, others, batches)


async def cluster_status(settings: Settings, catalog: Catalog) -> ClusterStatus:
    """What `phiserve status` prints: Serve's view through the current Ray connection, the
    queue and batches from the Redis in `settings`."""
    from services.app import APP_NAME

    app_status, deployments = serve_deployments(APP_NAME)
    state = RedisStore(settings.redis_url)
    try:
        return await collect_status(catalog, state, app_status, deployments)
    finally:
        await state.close()


def _value(enum_or_str: Any) -> Any:
    return getattr(enum_or_str, "value", enum_or_str)
