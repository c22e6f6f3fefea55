"""The prefix-affinity router's Serve `RequestRouter` (issue 13, item 1; adapters: issue 14)
over fake replicas, no cluster. The index and the choice it wraps: test_prefix_router.py."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID

from services.pools.engine import GenerationRequest
from services.pools.prefix_router import PrefixAffinityRouter, prompt_key
from tests.pools.test_prefix_router import SYSTEM, chat

DEPLOYMENT = DeploymentID(name="pool-text", app_name="phiserve")

# --- the Serve router --------------------------------------------------------------------


@dataclass
class FakeReplica:
    """What the base class and the router read of a `RunningReplica`."""

    replica_id: ReplicaID
    max_ongoing_requests: int = 64
    queue_len: int = 0
    probes: list[float] = field(default_factory=list)
    multiplexed_model_ids: set[str] = field(default_factory=set)  # the adapters it holds

    async def get_queue_len(self, *, deadline_s: float) -> int:
        self.probes.append(deadline_s)
        return self.queue_len


@dataclass
class RecordedMetrics:
    routes: list[tuple[str, str]] = field(default_factory=list)

    def routed(self, pool: str, route: str) -> None:
        self.routes.append((pool, route))


def replica(n: int) -> FakeReplica:
    return FakeReplica(ReplicaID(unique_id=f"rep{n}-{uuid.uuid4().hex[:6]}", deployment_id=DEPLOYMENT))


async def make_router(
    replicas: list[FakeReplica], *, max_imbalance: int = 2
) -> tuple[PrefixAffinityRouter, RecordedMetrics]:
    router = PrefixAffinityRouter(
        deployment_id=DEPLOYMENT,
        handle_source=DeploymentHandleSource.UNKNOWN,
        use_replica_queue_len_cache=True,
    )
    metrics = RecordedMetrics()
    router.initialize_state(max_imbalance=max_imbalance, pool="text", metrics=metrics)  # type: ignore[arg-type]
    router.update_replicas(replicas)  # type: ignore[arg-type]
    await probed(replicas)
    return router, metrics


async def probed(replicas: list[FakeReplica], timeout_s: float = 5.0) -> None:
    """The base class probes new replicas' queue lengths in a task of its own: wait for it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not all(r.probes for r in replicas):
        assert loop.time() < deadline, "the new replicas were never probed"
        await asyncio.sleep(0.001)


def pending(request: GenerationRequest | None, *, model_id: str = "") -> PendingRequest:
    metadata = RequestMetadata(
        request_id="r",
        internal_request_id=uuid.uuid4().hex,
        call_method="generate",
        multiplexed_model_id=model_id,
    )
    return PendingRequest(args=[request] if request is not None else [], kwargs={}, metadata=metadata)


async def route(router: PrefixAffinityRouter, request: GenerationRequest, *, model_id: str = "") -> ReplicaID:
    """One routing as Serve does it: rank 0 taken when it has room, then the routed callback."""
    pr = pending(request, model_id=model_id)
    ranks = await router.choose_replicas(router._replicas_list, pr)  # Serve's own argument
    chosen = next(r for rank in ranks for r in rank if r.queue_len < r.max_ongoing_requests)  # type: ignore[attr-defined]
    router.on_request_routed(pr, chosen.replica_id, result=None)
    return chosen.replica_id


def set_load(router: PrefixAffinityRouter, rep: FakeReplica, queue_len: int) -> None:
    rep.queue_len = queue_len
    router.on_new_queue_len_info(rep.replica_id, queue_len)


async def test_requests_sharing_a_prefix_stay_on_one_replica() -> None:
    reps = [replica(i) for i in range(3)]
    router, metrics = await make_router(reps)
    first = await route(router, chat("tenant-a", SYSTEM, "question 0"))
    for i in range(1, 8):
        assert await route(router, chat("tenant-a", SYSTEM, f"question {i}")) == first
    assert [r for _, r in metrics.routes] == ["spread"] + ["affinity"] * 7
    assert {p for p, _ in metrics.routes} == {"text"}


async def test_two_gateways_send_a_tenants_requests_to_the_same_replica() -> None:
    """Each gateway replica has its own router and index, sharing nothing: the first request
    of a prefix goes to the same replica from either, so the second gateway's requests find
    the cache the first one's filled."""
    reps = [replica(i) for i in range(4)]
    gateway_a, _ = await make_router(reps)
    gateway_b, metrics_b = await make_router(list(reversed(reps)))
    for n in range(8):
        system = f"tenant {n}: " + SYSTEM
        home = await route(gateway_a, chat(f"salt-{n}", system, "first"))
        assert await route(gateway_b, chat(f"salt-{n}", system, "second")) == home
        assert metrics_b.routes[-1][1] == "spread"  # b knew nothing, and agreed anyway


async def test_another_tenants_identical_prompt_is_not_routed_by_its_entries() -> None:
    """Attacker's side: tenant B sends tenant A's exact prompt. B's lookup finds nothing (it
    is placed as a new prefix of its own), and where B lands does not depend on where A's
    prefix lives: moving A's entries to another replica leaves B's placement unchanged."""
    reps = [replica(i) for i in range(4)]
    router, metrics = await make_router(reps)
    prompt_a = chat("salt-a", SYSTEM, "the secret plan")
    prompt_b = chat("salt-b", SYSTEM, "the secret plan")
    for _ in range(3):
        await route(router, prompt_a)
    b_key = prompt_key(prompt_b, block_bytes=router._block_bytes)
    live = {r.replica_id: r for r in reps}
    assert router.index.longest(b_key.blocks, live) == (0, ())
    b_with_a_known = await route(router, prompt_b)
    assert metrics.routes[-1][1] == "spread"

    fresh, _ = await make_router(reps)  # no entries of A at all
    a_key = prompt_key(prompt_a, block_bytes=fresh._block_bytes)
    elsewhere = next(r.replica_id for r in reps if r.replica_id != b_with_a_known)
    fresh.index.record(a_key.blocks, elsewhere)  # A's prefix on some other replica
    assert await route(fresh, prompt_b) == b_with_a_known


async def test_a_busy_affine_replica_falls_back_to_the_least_loaded() -> None:
    reps = [replica(i) for i in range(2)]
    router, metrics = await make_router(reps, max_imbalance=2)
    home = await route(router, chat("t", SYSTEM, "q"))
    home_rep = next(r for r in reps if r.replica_id == home)
    other_rep = next(r for r in reps if r.replica_id != home)
    set_load(router, home_rep, 3)
    set_load(router, other_rep, 1)
    assert await route(router, chat("t", SYSTEM, "q2")) == home  # 3 - 1 is within the bound
    set_load(router, home_rep, 4)
    assert await route(router, chat("t", SYSTEM, "q3")) == other_rep.replica_id
    assert [r for _, r in metrics.routes] == ["spread", "affinity", "fallback"]
    # Both now hold the prefix: the less busy one takes the next request, by affinity.
    assert await route(router, chat("t", SYSTEM, "q4")) == other_rep.replica_id
    assert metrics.routes[-1][1] == "affinity"


async def test_a_replica_that_leaves_is_forgotten_by_the_router() -> None:
    reps = [replica(i) for i in range(3)]
    router, _ = await make_router(reps)
    home = await route(router, chat("t", SYSTEM, "q"))
    router.update_replicas([r for r in reps if r.replica_id != home])  # type: ignore[arg-type]
    assert home not in router.index.holders()
    assert await route(router, chat("t", SYSTEM, "q2")) != home
    dying = await route(router, chat("u", SYSTEM, "q"))
    router.on_replica_actor_died(dying)
    assert dying not in router.index.holders()


async def test_calls_without_a_prompt_go_to_the_least_loaded() -> None:
    reps = [replica(i) for i in range(2)]
    router, metrics = await make_router(reps)
    ranks = await router.choose_replicas(router._replicas_list, pending(None))
    assert ranks == [router._replicas_list]  # one rank: the base class takes the least loaded
    assert metrics.routes == []


async def test_loads_missing_from_the_cache_are_probed() -> None:
    reps = [replica(i) for i in range(2)]
    router = PrefixAffinityRouter(
        deployment_id=DEPLOYMENT,
        handle_source=DeploymentHandleSource.UNKNOWN,
        use_replica_queue_len_cache=False,
    )
    router.initialize_state(metrics=RecordedMetrics())  # type: ignore[arg-type]
    router.update_replicas(reps)  # type: ignore[arg-type]
    await probed(reps)
    before = [len(r.probes) for r in reps]
    await router.choose_replicas(router._replicas_list, pending(chat("t", SYSTEM, "q")))
    assert [len(r.probes) for r in reps] == [n + 1 for n in before]
    assert router._pool == "text"  # from the deployment name when not given


def test_serve_ships_the_router_class_to_every_handle() -> None:
    """Serve pickles the class by value into the deployment config; what a handle's process
    loads back is this router."""
    config = RequestRouterConfig(
        request_router_class=PrefixAffinityRouter, request_router_kwargs={"max_imbalance": 3}
    )
    loaded = config.get_request_router_class()
    assert loaded.__name__ == "PrefixAffinityRouter"
    assert config.request_router_class == "services.pools.prefix_router.PrefixAffinityRouter"


def test_build_pool_routes_only_prefix_affinity_pools_with_it() -> None:
    from services.app import build_pool
    from services.catalog.loader import load_catalog
    from services.catalog.models import RoutingConfig
    from services.settings import Settings

    catalog = load_catalog("local")
    text = next(p for p in catalog.pools if p.name == "text")
    affine = text.model_copy(update={"routing": RoutingConfig(policy="prefix_affinity", max_imbalance=3)})
    config = build_pool(affine, catalog, Settings())._bound_deployment._deployment_config
    assert config.request_router_config.request_router_class == (
        "services.pools.prefix_router.PrefixAffinityRouter"
    )
    assert config.request_router_config.request_router_kwargs == {"max_imbalance": 3, "pool": "text"}
    default = build_pool(text, catalog, Settings())._bound_deployment._deployment_config
    assert default.request_router_config.is_default_request_router()


# --- tenants' adapters: Serve's multiplexing first, prefix affinity among the holders ------

ADAPTER = "ft:phi-3.5-mini:tenant-a:support@v1"


async def test_an_adapter_goes_to_its_holder_over_the_prefix_home() -> None:
    """The prefix lives on one replica, the adapter on another: the adapter's holder wins (a
    load costs more than a prefix miss), and the prefix's home is the next rank."""
    reps = [replica(i) for i in range(3)]
    router, _ = await make_router(reps)
    home = await route(router, chat("t", SYSTEM, "q"))
    holder = next(r for r in reps if r.replica_id != home)
    holder.multiplexed_model_ids = {ADAPTER}
    router.update_replicas(reps)  # type: ignore[arg-type]  # what Serve does when a replica reports
    ranks = await router.choose_replicas(
        router._replicas_list, pending(chat("t", SYSTEM, "q2"), model_id=ADAPTER)
    )
    assert [r.replica_id for r in ranks[0]] == [holder.replica_id]
    assert home in {r.replica_id for rank in ranks[1:] for r in rank}
    assert await route(router, chat("t", SYSTEM, "q3"), model_id=ADAPTER) == holder.replica_id
    # Without the adapter the prefix's home keeps it.
    assert await route(router, chat("t", SYSTEM, "q4")) == home


async def test_among_the_adapters_holders_a_prefix_keeps_its_home() -> None:
    reps = [replica(i) for i in range(4)]
    holders = reps[:2]
    for r in holders:
        r.multiplexed_model_ids = {ADAPTER}
    router, metrics = await make_router(reps)
    first = await route(router, chat("t", SYSTEM, "question 0"), model_id=ADAPTER)
    assert first in {r.replica_id for r in holders}
    for i in range(1, 6):
        assert await route(router, chat("t", SYSTEM, f"question {i}"), model_id=ADAPTER) == first
    assert [r for _, r in metrics.routes] == ["spread"] + ["affinity"] * 5
    # A busy holder hands over to the other holder, never to a replica without the adapter.
    busy = next(r for r in holders if r.replica_id == first)
    set_load(router, busy, 10)
    assert await route(router, chat("t", SYSTEM, "question 6"), model_id=ADAPTER) == next(
        r.replica_id for r in holders if r is not busy
    )


async def test_an_adapter_no_replica_holds_goes_where_fewest_are_loaded() -> None:
    reps = [replica(i) for i in range(3)]
    reps[0].multiplexed_model_ids = {"a@1", "b@1"}
    reps[1].multiplexed_model_ids = {"c@1"}
    reps[2].multiplexed_model_ids = {"d@1", "e@1", "f@1"}
    router, _ = await make_router(reps)
    ranks = await router.choose_replicas(
        router._replicas_list, pending(chat("t", SYSTEM, "q"), model_id=ADAPTER)
    )
    assert [r.replica_id for r in ranks[0]] == [reps[1].replica_id]
    assert {r.replica_id for rank in ranks for r in rank} == {
        r.replica_id for r in reps
    }  # others still ranked
