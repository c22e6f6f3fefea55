"""The prefix-affinity router (issue 13, item 1), pure: the prefix index, the choice, and the
Serve `RequestRouter` around them over fake replicas (no cluster)."""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field

import pytest
from ray.serve._private.common import DeploymentHandleSource, DeploymentID, RequestMetadata
from ray.serve.config import RequestRouterConfig
from ray.serve.request_router import PendingRequest, ReplicaID

from services.pools.engine import ChatMessage, GenerationRequest, SamplingOptions
from services.pools.prefix_router import (
    Choice,
    PrefixAffinityRouter,
    PrefixIndex,
    choose,
    prompt_key,
    rendezvous_score,
)

DEPLOYMENT = DeploymentID(name="pool-text", app_name="phiserve")
SYSTEM = "You are the support assistant of a shipping company. " * 40  # ~2 KB shared prefix
BLOCK = 256


def chat(salt: str | None, system: str, user: str) -> GenerationRequest:
    return GenerationRequest(
        request_id="r",
        model="phi-3.5-mini",
        sampling=SamplingOptions(max_tokens=4),
        messages=(ChatMessage("system", system), ChatMessage("user", user)),
        cache_salt=salt,
    )


# --- hashing ---------------------------------------------------------------------------


def test_same_tenant_prompts_share_their_leading_blocks() -> None:
    a = prompt_key(chat("salt-a", SYSTEM, "where is my parcel?"), block_bytes=BLOCK)
    b = prompt_key(chat("salt-a", SYSTEM, "cancel my order"), block_bytes=BLOCK)
    shared = len(SYSTEM) // BLOCK
    assert len(a.blocks) >= shared
    assert a.blocks[:shared] == b.blocks[:shared]
    assert a.seed == b.seed  # same first block: the same placement for a new prefix


def test_the_same_prompt_under_two_salts_shares_no_block() -> None:
    a = prompt_key(chat("salt-a", SYSTEM, "hello"), block_bytes=BLOCK)
    b = prompt_key(chat("salt-b", SYSTEM, "hello"), block_bytes=BLOCK)
    unsalted = prompt_key(chat(None, SYSTEM, "hello"), block_bytes=BLOCK)
    assert not set(a.blocks) & set(b.blocks)
    assert not set(a.blocks) & set(unsalted.blocks)
    assert len({a.seed, b.seed, unsalted.seed}) == 3


def test_a_salt_cannot_be_forged_from_another_salt_and_prompt_bytes() -> None:
    # The salt is length-prefixed: salt "ab" + prompt "c..." is not salt "abc" + "...".
    a = prompt_key(
        GenerationRequest("r", "m", SamplingOptions(), prompts=("c" + "x" * 600,), cache_salt="ab")
    )
    b = prompt_key(GenerationRequest("r", "m", SamplingOptions(), prompts=("x" * 600,), cache_salt="abc"))
    assert not set(a.blocks) & set(b.blocks)


def test_completion_text_and_token_ids_are_keyed() -> None:
    text = prompt_key(GenerationRequest("r", "m", SamplingOptions(), prompts=("y" * 1000,), cache_salt="s"))
    more = prompt_key(
        GenerationRequest("r", "m", SamplingOptions(), prompts=("y" * 1000 + "z",), cache_salt="s")
    )
    ids = prompt_key(
        GenerationRequest("r", "m", SamplingOptions(), prompts=(tuple(range(300)),), cache_salt="s")
    )
    assert text.blocks == more.blocks[: len(text.blocks)] and len(text.blocks) == 3
    assert len(ids.blocks) == 300 * 4 // 256
    assert not set(ids.blocks) & set(text.blocks)


def test_a_short_prompt_has_no_block_but_a_seed_of_its_own() -> None:
    a = prompt_key(chat("s", "hi", "x"))
    b = prompt_key(chat("s", "hi", "y"))
    assert a.blocks == () and b.blocks == ()
    assert a.seed != b.seed


# --- the index ---------------------------------------------------------------------------


def test_the_longest_prefix_held_by_a_live_replica_wins() -> None:
    index: PrefixIndex[str] = PrefixIndex()
    key = prompt_key(chat("s", SYSTEM, "q1"), block_bytes=BLOCK)
    index.record(key.blocks[:2], "r1")
    index.record(key.blocks, "r2")
    assert index.longest(key.blocks, {"r1", "r2"}) == (len(key.blocks), ("r2",))
    # r2 left: only r1's two blocks are known.
    assert index.longest(key.blocks, {"r1"}) == (2, ("r1",))
    assert index.longest(key.blocks, set()) == (0, ())


def test_replicas_that_leave_are_forgotten() -> None:
    index: PrefixIndex[str] = PrefixIndex()
    a = prompt_key(chat("s", SYSTEM, "q1"), block_bytes=BLOCK)
    b = prompt_key(chat("t", SYSTEM, "q1"), block_bytes=BLOCK)
    index.record(a.blocks, "r1")
    index.record(a.blocks, "r2")
    index.record(b.blocks, "r2")
    index.forget({"r2"})
    assert index.holders() == {"r1"}
    assert len(index) == len(a.blocks)  # b's blocks had no other holder: gone
    assert index.longest(a.blocks, {"r1", "r2"}) == (len(a.blocks), ("r1",))


def test_memory_is_bounded_and_a_shared_beginning_outlives_deep_blocks() -> None:
    index: PrefixIndex[str] = PrefixIndex(max_blocks=64)
    hot = prompt_key(chat("s", SYSTEM, "hot"), block_bytes=BLOCK)
    for i in range(200):
        index.record(prompt_key(chat(f"t{i}", SYSTEM, str(i)), block_bytes=BLOCK).blocks, f"r{i % 3}")
        index.record(hot.blocks, "r0")  # one tenant's system prompt stays in use
        assert len(index) <= 64
    assert index.longest(hot.blocks, {"r0"})[0] == len(hot.blocks)


def test_an_unbounded_index_is_refused() -> None:
    with pytest.raises(ValueError):
        PrefixIndex(max_blocks=0)


# --- the choice --------------------------------------------------------------------------


def test_affinity_within_the_load_bound() -> None:
    choice = choose(["r1", "r2"], {"r1": 4, "r2": 0}, ("r1",), b"seed", max_imbalance=4)
    assert (choice.replica, choice.route) == ("r1", "affinity")


def test_the_load_bound_falls_back_to_the_least_loaded() -> None:
    choice = choose(["r1", "r2", "r3"], {"r1": 6, "r2": 3, "r3": 1}, ("r1",), b"seed", max_imbalance=4)
    assert (choice.replica, choice.route) == ("r3", "fallback")


def test_of_several_holders_the_prefix_keeps_its_home_while_within_the_bound() -> None:
    """After a fallback two replicas hold a prefix: the one rendezvous ranks first (its home)
    keeps taking it, even when the other holder is less loaded, so a tenant is not spread
    over both for good; the next holder takes it only while the home is over the bound."""
    holders = ("r1", "r2")
    home = max(holders, key=lambda r: rendezvous_score(b"seed", r))
    other = next(r for r in holders if r != home)
    loads = {home: 3, other: 1, "r3": 0}
    assert choose(["r1", "r2", "r3"], loads, holders, b"seed", max_imbalance=4) == Choice(home, "affinity")
    loads = {home: 9, other: 1, "r3": 0}
    assert choose(["r1", "r2", "r3"], loads, holders, b"seed", max_imbalance=4) == Choice(other, "affinity")
    loads = {home: 9, other: 9, "r3": 0}
    assert choose(["r1", "r2", "r3"], loads, holders, b"seed", max_imbalance=4) == Choice("r3", "fallback")


def test_a_new_prefix_goes_where_rendezvous_points_whatever_the_order() -> None:
    replicas = [f"replica-{i}" for i in range(4)]
    placed = {}
    for n in range(64):
        seed = f"first block {n}".encode()
        winner = max(replicas, key=lambda r: rendezvous_score(seed, r))
        for order in (replicas, list(reversed(replicas))):
            choice = choose(order, {r: 0 for r in replicas}, (), seed, max_imbalance=4)
            assert (choice.replica, choice.route) == (winner, "spread")
        placed[winner] = placed.get(winner, 0) + 1
    assert len(placed) == 4  # the seeds spread over every replica


def test_a_new_prefix_respects_the_load_bound() -> None:
    seed = b"first block"
    winner = max(["r1", "r2"], key=lambda r: rendezvous_score(seed, r))
    other = "r2" if winner == "r1" else "r1"
    choice = choose(["r1", "r2"], {winner: 9, other: 2}, (), seed, max_imbalance=4)
    assert (choice.replica, choice.route) == (other, "spread")


def test_unknown_loads_count_as_the_least_known() -> None:
    choice = choose(["r1", "r2"], {"r2": 5}, ("r1",), b"seed", max_imbalance=0)
    assert (choice.replica, choice.route) == ("r1", "affinity")


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
