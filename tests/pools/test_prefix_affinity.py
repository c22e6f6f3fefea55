"""Prefix-affinity routing on real replicas (issue 13, item 1): two replicas of a tiny text
pool, built by `services.app.build_pool` with `routing.policy: prefix_affinity`, driven through
its Serve handle with per-tenant cache salts. The workload (4 tenants, each with its own long
system prompt, interleaved) reaches the prefix-cache hit rate of one replica, both replicas
work, and two tenants with the same prompt share no cache entry."""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from ray import serve
from ray.serve.request_router import RequestRouter

from services.app import build_pool, pool_deployment_name
from services.catalog.models import DeploymentConfig, Modality, PoolConfig, RoutingConfig
from services.pools.engine import ChatMessage, GenerationRequest, GenerationResult, SamplingOptions
from services.pools.prefix_router import prompt_key, rendezvous_score
from services.pools.prompts import PromptRenderer
from tests.conftest import Cluster, wait_until
from tests.pools.serve_front import front_class

APP = "prefix-affinity-test"
POOL = "affinity"
# vLLM's CPU backend caches whole blocks of 128 tokens (tests/gateway/test_prefix_cache.py).
CPU_BLOCK_TOKENS = 128
TENANTS = 4
TURNS = 6
MAX_TOKENS = 2


@dataclass
class AffinityPool:
    pool: PoolConfig
    handle: Any  # serve.handle.DeploymentHandle
    tokenizer: Any

    def router(self) -> RequestRouter:
        # The handle's own router instance: Serve builds it from the deployment's config.
        router = self.handle._router._asyncio_router.request_router
        assert router is not None
        return router  # type: ignore[no-any-return]


def _running_replicas() -> int:
    status = serve.status().applications[APP].deployments[f"pool-{POOL}"]
    return int(status.replica_states.get("RUNNING", 0)) if status.status == "HEALTHY" else -1


@pytest.fixture(scope="module")
def affinity_pool(cluster: Cluster) -> Iterator[AffinityPool]:
    from transformers import AutoTokenizer

    text = next(p for p in cluster.catalog.enabled_pools if p.name == "text")
    deployment = DeploymentConfig.model_validate({**text.deployment.model_dump(), "num_replicas": 2})
    pool = text.model_copy(
        update={
            "name": POOL,
            "served_names": ["affinity-test"],
            "aliases": [],
            "long_context_pool": None,
            "routing": RoutingConfig(policy="prefix_affinity", max_imbalance=4),
            "deployment": deployment,
        }
    )
    front = serve.deployment(name="front", ray_actor_options={"num_cpus": 0})(front_class())
    app = front.bind(build_pool(pool, cluster.catalog, cluster.settings))
    serve.run(app, name=APP, route_prefix=None, blocking=False)
    try:
        wait_until(lambda: _running_replicas() == 2, timeout_s=480, interval_s=2, what="two replicas running")
        handle = serve.get_deployment_handle(pool_deployment_name(pool), app_name=APP)
        tokenizer = AutoTokenizer.from_pretrained(
            pool.resolve_model_path(cluster.settings.model_dir.resolve())
        )
        affinity = AffinityPool(pool, handle, tokenizer)
        # Serve builds a handle's router at its first request; Ray's metrics agent has the
        # router's first count a report interval later: both settled before any test counts.
        _generate(affinity, _chat("tenant-probe", "Say something.", "hi"))
        wait_until(lambda: sum(_routed(cluster).values()) >= 1, timeout_s=60, what="the first routed count")
        yield affinity
    finally:
        serve.delete(APP)


def _chat(salt: str, system: str, user: str) -> GenerationRequest:
    return GenerationRequest(
        request_id=f"affinity-{uuid.uuid4().hex[:8]}",
        model="affinity-test",
        sampling=SamplingOptions(max_tokens=MAX_TOKENS, temperature=0),
        messages=(ChatMessage("system", system), ChatMessage("user", user)),
        cache_salt=salt,
    )


def _system_prompt(tenant: str) -> str:
    # ~2,000 characters (~600 tokens of the tiny tokenizer): several whole cache blocks, and
    # a fresh first line so no earlier run or test has this prefix cached.
    rules = " ".join(
        f"Rule {i}: answer questions about order {i * 7 + 3} within {i + 2} days." for i in range(34)
    )
    return f"You are the assistant of {tenant} ({uuid.uuid4().hex}). {rules}"


def _generate(pool: AffinityPool, request: GenerationRequest) -> GenerationResult:
    result: GenerationResult = pool.handle.generate.remote(request).result(timeout_s=180)
    return result


def _tokens(pool: AffinityPool, request: GenerationRequest) -> list[int]:
    """The prompt's token ids as the engine sees them: the pool's chat template, then the
    tokenizer (the test asserts the counts agree with the engine's)."""
    text = PromptRenderer(pool.tokenizer, modality=Modality.text).render(request)
    return list(pool.tokenizer(text)["input_ids"])


def _ideal_cached(tokens: list[int], earlier: list[list[int]]) -> int:
    """What one replica that kept every block would serve from its cache: the longest common
    prefix with an earlier prompt of the same tenant, in whole blocks, leaving at least the
    last token to compute (vLLM's rule)."""
    common = max((len(os.path.commonprefix([tokens, other])) for other in earlier), default=0)
    return min(common, len(tokens) - 1) // CPU_BLOCK_TOKENS * CPU_BLOCK_TOKENS


def _placement(router: RequestRouter, request: GenerationRequest) -> str:
    """Where the router places a prompt nobody has sent: rendezvous over the live replicas."""
    seed = prompt_key(request).seed
    return max((r.unique_id for r in router._replica_id_set), key=lambda rid: rendezvous_score(seed, rid))


def _tenants_two_per_replica(pool: AffinityPool) -> list[tuple[str, str]]:
    """Four tenants (salt, system prompt) whose new prefixes rendezvous two on each replica.

    Rendezvous hashing puts four random prefixes all on one of two replicas one time in
    eight; picking the tenants so the workload has two replicas' worth of distinct prefixes
    makes "both replicas got work" a check of the routing, not of the hash's luck."""
    router = pool.router()
    per_replica: dict[str, list[tuple[str, str]]] = {r.unique_id: [] for r in router._replica_id_set}
    assert len(per_replica) == 2
    for i in range(64):
        salt, system = f"tenant-{i}-{uuid.uuid4().hex[:6]}", _system_prompt(f"tenant {i}")
        home = per_replica[_placement(router, _chat(salt, system, "hello"))]
        if len(home) < TENANTS // 2:
            home.append((salt, system))
        if all(len(v) == TENANTS // 2 for v in per_replica.values()):
            return [t for pair in zip(*per_replica.values(), strict=True) for t in pair]
    raise AssertionError("no two tenants per replica among 64 candidates")


def _scrape(cluster: Cluster, metric: str, selector: str, label: str) -> dict[str, float]:
    """`metric`'s samples that carry `selector`, summed by `label`, from Ray's metrics agent."""
    text = httpx.get(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=10).text
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(metric + "{") or selector not in line:
            continue
        value = re.search(label + r'="([^"]+)"', line)
        if value:
            counts[value.group(1)] = counts.get(value.group(1), 0.0) + float(line.rsplit(" ", 1)[1])
    return counts


def _serve_requests_by_replica(cluster: Cluster) -> dict[str, float]:
    """Requests each replica of the pool handled, as the replicas report them (Serve's own
    per-replica counter, not the router's view)."""
    return _scrape(cluster, "ray_serve_deployment_request_counter_total", f'application="{APP}"', "replica")


def _routed(cluster: Cluster) -> dict[str, float]:
    """phiserve_pool_routed_total of the pool by route, recorded by the router in this process."""
    return _scrape(cluster, "ray_phiserve_pool_routed_total", f'pool="{POOL}"', "route")


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}


def test_the_pool_handle_routes_with_the_prefix_affinity_router(affinity_pool: AffinityPool) -> None:
    router = affinity_pool.router()
    assert type(router).__name__ == "PrefixAffinityRouter"
    assert type(router).__module__ == "services.pools.prefix_router"
    assert router._max_imbalance == 4 and router._pool == POOL


def test_four_tenants_reach_one_replicas_hit_rate_on_two(
    cluster: Cluster, affinity_pool: AffinityPool
) -> None:
    tenants = _tenants_two_per_replica(affinity_pool)
    before, routed_before = _serve_requests_by_replica(cluster), _routed(cluster)
    prompt_tokens = cached_tokens = ideal_tokens = 0
    seen: dict[str, list[list[int]]] = {salt: [] for salt, _ in tenants}
    for turn in range(TURNS):  # interleaved: every tenant's k-th request before any k+1-th
        for n, (salt, system) in enumerate(tenants):
            user = (
                f"Question {turn} of customer {n}: "
                + "where is parcel number " * (1 + (turn + n) % 4)
                + str(turn)
            )
            request = _chat(salt, system, user)
            tokens = _tokens(affinity_pool, request)
            result = _generate(affinity_pool, request)
            assert result.prompt_tokens == len(tokens)
            prompt_tokens += result.prompt_tokens
            cached_tokens += result.cached_tokens
            ideal_tokens += _ideal_cached(tokens, seen[salt])
            seen[salt].append(tokens)
    hit_rate, ideal = cached_tokens / prompt_tokens, ideal_tokens / prompt_tokens
    # One replica would miss only each tenant's first request: (TURNS - 1) / TURNS of the
    # shared prefixes. Serve's default router misses it about once per tenant AND replica.
    assert ideal > 0.5, ideal
    assert hit_rate >= 0.9 * ideal, (hit_rate, ideal)
    print(f"prefix affinity: hit rate {hit_rate:.3f}, one replica's {ideal:.3f}")  # shown with -s

    total = TENANTS * TURNS

    def counted() -> dict[str, float] | None:
        done = _delta(_serve_requests_by_replica(cluster), before)
        return done if sum(done.values()) >= total else None

    done = wait_until(counted, timeout_s=60, interval_s=1, what="Serve's request counters")
    assert len([r for r, n in done.items() if n >= TURNS]) == 2, done  # both replicas got work

    # Each tenant's first request placed a new prefix; every later one followed it.
    def routed() -> dict[str, float] | None:
        by_route = _delta(_routed(cluster), routed_before)
        return by_route if sum(by_route.values()) >= total else None

    by_route = wait_until(routed, timeout_s=60, interval_s=1, what="phiserve_pool_routed_total")
    assert by_route.get("spread") == TENANTS and by_route.get("affinity") == total - TENANTS, by_route


def test_two_tenants_with_the_same_prompt_share_no_cache_entry(affinity_pool: AffinityPool) -> None:
    """Tenant B sends tenant A's exact prompt to the very replica that holds A's blocks: no
    cached token (vLLM's salt), and B's route did not come from A's entries."""
    router = affinity_pool.router()
    system, user = _system_prompt("shared"), "the same question, word for word"
    a_salt = f"tenant-a-{uuid.uuid4().hex[:6]}"
    first = _generate(affinity_pool, _chat(a_salt, system, user))
    again = _generate(affinity_pool, _chat(a_salt, system, user))
    assert first.cached_tokens == 0
    assert again.cached_tokens >= CPU_BLOCK_TOKENS  # A's own repeat hits A's cache
    a_home = _placement(router, _chat(a_salt, system, user))
    # A tenant B whose own placement is A's replica: the identical prompt lands where A's
    # blocks live, so only the salt keeps them apart.
    b_salt = next(
        salt
        for salt in (f"tenant-b-{i}-{uuid.uuid4().hex[:6]}" for i in range(64))
        if _placement(router, _chat(salt, system, user)) == a_home
    )
    a_blocks = prompt_key(_chat(a_salt, system, user)).blocks
    b_blocks = prompt_key(_chat(b_salt, system, user)).blocks
    live = {r: None for r in router._replica_id_set}
    assert router.index.longest(b_blocks, live) == (0, ())
    b_first = _generate(affinity_pool, _chat(b_salt, system, user))
    assert b_first.prompt_tokens == first.prompt_tokens
    assert b_first.cached_tokens == 0
    # B was served by A's replica (placed there by its own first block), and the index keeps
    # the two tenants' entries apart.
    assert [r.unique_id for r in router.index.longest(b_blocks, live)[1]] == [a_home]
    assert [r.unique_id for r in router.index.longest(a_blocks, live)[1]] == [a_home]
    assert not set(a_blocks) & set(b_blocks)
