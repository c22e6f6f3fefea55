"""Tenants' LoRA adapters through Ray Serve's model multiplexing on real replicas (issue 14).

Driven through `PoolRouter` (services/inference/router.py), the gateway's one handle hop, so
the handle carries the adapter's multiplexing key as the gateway sends it:

* the session cluster's `text` pool (one replica, Serve's default router, 4 adapters kept):
  more adapters than it keeps, concurrently, all answer with their own text, and the replica's
  eviction counter moves; broken adapter files cross the handle as a 400 and the pool goes on;
* a pool of two replicas (2 adapters kept each, phiserve's prefix-affinity router with Serve's
  MultiplexMixin), deployed beside the cluster's app: each adapter is loaded once, on one
  replica, and every later request for it goes there (the load counter stays at one per
  adapter); a fifth adapter evicts one, and the evicted one loads again when asked.
"""

from __future__ import annotations

import asyncio
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from ray import serve

from services.app import build_pool, pool_deployment_name
from services.catalog.models import DeploymentConfig, PoolConfig, RoutingConfig
from services.errors import InvalidAdapter
from services.inference.router import PoolRouter
from services.pools.adapter_cache import adapter_key
from services.pools.engine import AdapterRef, GenerationRequest, SamplingOptions
from tests.conftest import Cluster, wait_until
from tests.pools.serve_front import front_class

APP = "adapter-multiplex-test"
POOL = "mux"
PROMPT = "def main():\n    values = [1, 2, 3]\n    return"
MAX_TOKENS = 8
TIMEOUT_S = 180.0


@dataclass
class MuxPool:
    pool: PoolConfig
    handle: Any
    router: PoolRouter

    def request_router(self) -> Any:
        """The handle's Serve request router (the one the multiplexed handles share)."""
        return self.handle._router._asyncio_router.request_router


def _running_replicas() -> int:
    status = serve.status().applications[APP].deployments[f"pool-{POOL}"]
    return int(status.replica_states.get("RUNNING", 0)) if status.status == "HEALTHY" else -1


@pytest.fixture(scope="module")
def mux_pool(cluster: Cluster, tiny_adapters: dict[str, Path]) -> Iterator[MuxPool]:
    text = next(p for p in cluster.catalog.enabled_pools if p.name == "text")
    engine = text.engine.model_copy(update={"max_loras": 1, "max_cpu_loras": 2})
    pool = text.model_copy(
        update={
            "name": POOL,
            "served_names": ["mux-test"],
            "aliases": [],
            "long_context_pool": None,
            "engine": engine,
            "routing": RoutingConfig(policy="prefix_affinity", max_imbalance=4),
            "deployment": DeploymentConfig.model_validate(
                {**text.deployment.model_dump(), "num_replicas": 2}
            ),
        }
    )
    assert pool.engine.adapters_per_replica == 2
    front = serve.deployment(name="front", ray_actor_options={"num_cpus": 0})(front_class())
    app = front.bind(build_pool(pool, cluster.catalog, cluster.settings))
    serve.run(app, name=APP, route_prefix=None, blocking=False)
    try:
        wait_until(lambda: _running_replicas() == 2, timeout_s=480, interval_s=2, what="two replicas running")
        handle = serve.get_deployment_handle(pool_deployment_name(pool), app_name=APP)
        router = PoolRouter(cluster.catalog, {POOL: handle}, assign_timeout_s=TIMEOUT_S)
        yield MuxPool(pool, handle, router)
    finally:
        serve.delete(APP)


def _adapter(tiny_adapters: dict[str, Path], i: int, *, tenant: str = "tenant-mux") -> AdapterRef:
    return AdapterRef(
        model_id=f"ft:phi-3.5-mini:{tenant}:mini-{i}",
        path=str(tiny_adapters[f"tiny/phi-3.5-mini-{i}"]),
        version=uuid.uuid4().hex[:8],  # fresh per test module run: nothing cached from before
    )


def _request(model: str, adapter: AdapterRef | None) -> GenerationRequest:
    return GenerationRequest(
        request_id=f"mux-{uuid.uuid4().hex[:8]}",
        model=model,
        sampling=SamplingOptions(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True),
        prompts=(PROMPT,),
        adapter=adapter,
    )


async def _text(
    router: PoolRouter, pool: PoolConfig, adapter: AdapterRef | None, *, stream: bool = False
) -> str:
    request = _request(pool.names[0] if pool.names else pool.name, adapter)
    if stream:
        return "".join([c.text async for c in router.stream(pool, request)])
    result = await asyncio.wait_for(router.generate(pool, request), TIMEOUT_S)
    assert result.completion_tokens == MAX_TOKENS
    return result.text


def _scrape(cluster: Cluster, metric: str, pool: str, label: str = "pool") -> dict[str, float]:
    """`metric`'s samples of `pool`, summed by `label`, from Ray's metrics agent."""
    text = httpx.get(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=10).text
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(metric + "{") or f'pool="{pool}"' not in line:
            continue
        value = re.search(label + r'="([^"]+)"', line)
        if value:
            sums[value.group(1)] = sums.get(value.group(1), 0.0) + float(line.rsplit(" ", 1)[1])
    return sums


def _total(cluster: Cluster, event: str, pool: str) -> float:
    return sum(_scrape(cluster, f"ray_phiserve_adapter_{event}_total", pool).values())


def _settled_total(cluster: Cluster, event: str, pool: str, at_least: float) -> float:
    """The counter once Ray's agent reports at least `at_least` (reports lag by an interval)."""
    wait_until(lambda: _total(cluster, event, pool) >= at_least, timeout_s=60, what=f"{event} >= {at_least}")
    return _total(cluster, event, pool)


# --- one replica: the cluster's text pool ------------------------------------------------------


def _text_pool(cluster: Cluster) -> tuple[PoolRouter, PoolConfig]:
    text = next(p for p in cluster.catalog.enabled_pools if p.name == "text")
    handle = serve.get_deployment_handle(pool_deployment_name(text), app_name="phiserve")
    return PoolRouter(cluster.catalog, {"text": handle}, assign_timeout_s=TIMEOUT_S), text


async def test_more_adapters_than_the_replica_keeps_all_answer(
    cluster: Cluster, tiny_adapters: dict[str, Path]
) -> None:
    router, text = _text_pool(cluster)
    adapters = [_adapter(tiny_adapters, i) for i in range(1, 7)]  # 6 > 4 kept > 2 per step
    alone = [await _text(router, text, a) for a in adapters]
    base = await _text(router, text, None)
    assert len({base, *alone}) == 7
    evictions = _total(cluster, "evictions", "text")
    together = await asyncio.wait_for(
        asyncio.gather(*(_text(router, text, a, stream=n % 2 == 1) for n, a in enumerate(adapters * 2))),
        TIMEOUT_S,
    )
    assert together == alone * 2
    assert _settled_total(cluster, "evictions", "text", evictions + 1) > evictions


async def test_broken_adapter_files_are_a_400_across_the_handle(
    cluster: Cluster, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    router, text = _text_pool(cluster)
    good = _adapter(tiny_adapters, 2)
    before = await _text(router, text, good)
    folder = tmp_path / "no-weights"
    shutil.copytree(tiny_adapters["tiny/phi-3.5-mini-3"], folder)
    (folder / "adapter_model.safetensors").unlink()
    broken = AdapterRef(model_id="ft:phi-3.5-mini:tenant-mux:broken", path=str(folder), version="v1")
    failures = _total(cluster, "load_failures", "text")
    with pytest.raises(InvalidAdapter) as unary:
        await router.generate(text, _request("phi-3.5-mini", broken))
    assert unary.value.code == "invalid_adapter" and unary.value.param == "model"
    with pytest.raises(InvalidAdapter):
        await anext(router.stream(text, _request("phi-3.5-mini", broken)))
    assert await _text(router, text, good) == before
    assert _settled_total(cluster, "load_failures", "text", failures + 2) == failures + 2


# --- two replicas: requests go where the adapter is -------------------------------------------


def _holders(mux: MuxPool, adapter: AdapterRef) -> set[Any]:
    return set(mux.request_router()._multiplexed_model_id_to_replica_ids.get(adapter_key(adapter), set()))


async def test_each_adapter_is_loaded_once_and_served_where_it_is(
    cluster: Cluster, mux_pool: MuxPool, tiny_adapters: dict[str, Path]
) -> None:
    router, pool = mux_pool.router, mux_pool.pool
    adapters = [_adapter(tiny_adapters, i) for i in range(1, 5)]  # 2 replicas x 2 kept
    loads = _total(cluster, "loads", POOL)
    first = {}
    for adapter in adapters:
        first[adapter.model_id] = await _text(router, pool, adapter)
        # The replica reports what it holds to Serve's controller, which tells the handles.
        wait_until(lambda a=adapter: _holders(mux_pool, a), timeout_s=30, interval_s=0.1, what="holder known")
    # Placed where the fewest adapters were: two on each replica.
    holders = {a.model_id: _holders(mux_pool, a) for a in adapters}
    assert all(len(h) == 1 for h in holders.values())
    per_replica: dict[Any, int] = {}
    for h in holders.values():
        for replica in h:
            per_replica[replica] = per_replica.get(replica, 0) + 1
    assert sorted(per_replica.values()) == [2, 2]
    # Three more rounds, interleaved, streamed and unary: every answer is the adapter's own,
    # and no replica loaded anything again.
    for round_ in range(3):
        for adapter in adapters:
            assert await _text(router, pool, adapter, stream=round_ % 2 == 0) == first[adapter.model_id]
    assert _settled_total(cluster, "loads", POOL, loads + 4) == loads + 4
    assert _total(cluster, "evictions", POOL) == 0

    # A fifth adapter: one replica evicts its least recently used; the evicted one loads again.
    fifth = _adapter(tiny_adapters, 5)
    assert await _text(router, pool, fifth) not in first.values()
    assert _settled_total(cluster, "evictions", POOL, 1) == 1
    for adapter in adapters:  # all answer as before, one of them reloaded
        assert await _text(router, pool, adapter) == first[adapter.model_id]
    assert _settled_total(cluster, "loads", POOL, loads + 6) >= loads + 6


async def test_the_pools_router_is_the_prefix_router_with_multiplexing(mux_pool: MuxPool) -> None:
    from ray.serve.request_router import MultiplexMixin

    router = mux_pool.request_router()
    assert type(router).__name__ == "PrefixAffinityRouter" and isinstance(router, MultiplexMixin)
