"""An autoscaled pool's fair-queue capacity follows its live replicas (issue 9, item 9),
on real Redis. It used to be max_replicas x max_num_seqs from the start: a pool running one
replica let four replicas' worth of requests past the fair queue into Serve's queue."""

from __future__ import annotations

import pytest

from services.catalog.loader import load_catalog
from services.catalog.models import AutoscalingConfig, DeploymentConfig, PoolConfig
from services.errors import Overloaded
from services.redis_store import RedisStore
from services.tenancy.fair_queue import FairQueue, Grant


def _autoscaled() -> PoolConfig:
    text = load_catalog("local").enabled_pools[0]
    return text.model_copy(
        update={
            "deployment": DeploymentConfig(
                num_replicas=None, autoscaling=AutoscalingConfig(min_replicas=1, max_replicas=4)
            ),
            "engine": text.engine.model_copy(update={"max_num_seqs": 2}),
        }
    )


async def _take(fq: FairQueue, pool: str) -> Grant:
    return await fq.acquire(pool, tenant_id="t", cost=1, weight=1, priority=1, timeout_s=0.2)


async def test_autoscaled_pool_admits_what_its_live_replicas_run(state: RedisStore) -> None:
    pool = _autoscaled()
    # As the gateway builds it: before any replica count is known, the replicas Serve starts.
    fq = FairQueue(state, {pool.name: pool.capacity}, max_waiting=10, lease_ttl_s=30)
    await _take(fq, pool.name)
    await _take(fq, pool.name)
    with pytest.raises(Overloaded):
        await _take(fq, pool.name)  # one replica x 2 sequences are in flight

    from services.inference.capacity import PoolCapacity

    live = {pool.name: 3}

    async def live_replicas() -> dict[str, int]:
        return live

    capacity = PoolCapacity([pool], fq, live_replicas)
    await capacity.refresh()  # Serve started two more replicas
    for _ in range(4):
        await _take(fq, pool.name)
    with pytest.raises(Overloaded):
        await _take(fq, pool.name)
    live[pool.name] = 0  # scaled to zero: still one replica's worth, so Serve sees demand
    await capacity.refresh()
    assert fq.capacity(pool.name) == 2
