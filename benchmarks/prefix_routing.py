"""Prefix-cache hit rate and TTFT with Serve's default router against phiserve's prefix-affinity
router, on the same shared-prefix multi-tenant workload, in one run (issue 13).

Setup: one local phiserve (in-process Ray, a private Redis, tenancy on) serving two pools of
the tiny Phi-3.5-mini, both alive for the whole run, each with `--replicas` (2) replicas:
  least-loaded     routing.policy least_loaded: Serve's default (power of two choices)
  prefix-affinity  routing.policy prefix_affinity (services/pools/prefix_router.py)
Both alive at once rather than redeployed per round: a redeploy restarts the engines (minutes
on 2 cores) and empties their caches, and alternating rounds between two live pools lets the
machine's drift hit both alike. A pool only runs while its round does.

Workload: `--tenants` (8) tenants created through the admin API, each with its own API key and
so its own cache salt (vLLM keeps tenants' cache entries apart); each has a system prompt of
`--prefix-tokens` (3000) tokens of random words and sends varied user turns (20-60 words),
`--max-tokens` (4) tokens answered, streamed. A round is `--requests` (48) requests, tenants
shuffled, `--concurrency` (6) at a time. Rounds alternate pools (the order flips every round)
after one warm-up round each (not counted): the caches start the measured rounds warm.

KV cache: each replica's `kv_cache_memory_bytes` holds `--cache-tenants` (4) tenants' system
prompts (plus the running requests' own tokens). That is the regime prefix routing is for: all
tenants' prefixes do not fit one replica's cache, and they fit the pool's when each replica
keeps its own tenants. With `--cache-tenants` >= `--tenants` every replica holds every prefix
after its first miss, and the routers differ only by those misses.

Prompts of `--prefix-tokens` make prefill the larger part of TTFT on the tiny model: the
output shows TTFT p50 of requests whose prefix was cached against those it was not. The pools'
max_model_len is `--max-model-len` (4096; LongRoPE's long factors: both pools alike).

Hit rate = cached prompt tokens / prompt tokens, summed over the measured rounds, from each
request's usage (`prompt_tokens_details.cached_tokens`: the engine's own count per request,
attributable to a round, unlike vLLM's counters). vLLM's counters
(`ray_vllm_prefix_cache_hits_total` / `_queries_total`, model_name = pool) are printed for the
whole run as a cross-check, beside the router's decisions (`ray_phiserve_pool_routed_total`).

    .venv/bin/python benchmarks/prefix_routing.py [--rounds 4] [--requests 48] [--cache-tenants 4]
        [--max-imbalance N]   (prefix-affinity's load bound; the catalog's default otherwise)

Per replica (vLLM's counters by ReplicaId) the share of prompt tokens and hit rate, and the hit
rate per tenant, show where a pool's misses come from (an uneven split of the tenants, or
tenants spread over both replicas). Results and their reading: docs/benchmarks.md, issue 13.

Ends with RESULT prefix_routing hit_rate_ratio=X ttft_p50_ratio=Y (prefix-affinity / least-loaded).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
import urllib.request
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from _common import CACHE_DIR, REPO, deploy, free_port, pct, serve_session, sse_data

sys.path.insert(0, str(REPO))

ADMIN_KEY = "prefix-routing-bench-admin-key-0123456789"
POLICIES = {"least-loaded": "least_loaded", "prefix-affinity": "prefix_affinity"}  # pool: policy
# Filler words of the prompts (one string reads better than a 32-line list).
WORDS = (  # noqa: SIM905
    "river stone maple copper violet harbor signal lantern meadow quartz ember falcon glacier "
    "orbit prairie cedar delta willow summit canyon beacon thistle marble cobalt sparrow tundra "
    "ridge lagoon pepper saffron granite juniper"
).split()
KV_BYTES_PER_TOKEN = 1024  # tiny Phi-3.5-mini: 2 layers x (K, V) x 4 heads x 32 dims x 2 bytes
BLOCK_TOKENS = 128  # vLLM's CPU block size: a prefix is cached in whole blocks


@dataclass
class Sample:
    pool: str
    tenant: int
    ttft_s: float | None
    prompt_tokens: int
    cached_tokens: int


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=8)
    parser.add_argument("--prefix-tokens", type=int, default=3000, help="system prompt per tenant")
    parser.add_argument("--requests", type=int, default=48, help="requests per round and pool")
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=4, help="measured rounds per pool")
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument(
        "--cache-tenants", type=float, default=4, help="system prompts one replica's KV holds"
    )
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument(
        "--max-imbalance",
        type=int,
        default=None,
        help="prefix-affinity's routing.max_imbalance (catalog default)",
    )
    parser.add_argument("--seed", type=int, default=13)
    return parser.parse_args()


def bench_catalog(args: argparse.Namespace) -> Any:
    """The local profile's text pool twice, as `least-loaded` and `prefix-affinity`."""
    from services.catalog.loader import load_catalog
    from services.catalog.models import Catalog

    local = load_catalog("local")
    text = next(p for p in local.pools if p.name == "text").model_dump()
    # Room for the prompts it should keep, and for the running requests' own blocks.
    running = args.concurrency * (2 * BLOCK_TOKENS + args.max_tokens)
    kv_tokens = int(args.cache_tenants * args.prefix_tokens) + running
    engine = {
        **text["engine"],
        "max_model_len": args.max_model_len,
        "kv_cache_memory_bytes": kv_tokens * KV_BYTES_PER_TOKEN,
    }
    # prefix_affinity's load bound (least_loaded has none).
    bound = {} if args.max_imbalance is None else {"max_imbalance": args.max_imbalance}
    # Validated afresh, not model_copy'd: a copy would keep what the catalog derived for the
    # text pool from its long_context_pool (its 2048-token context).
    pools = [
        {
            **text,
            "name": pool,
            "served_names": [pool],
            "aliases": [],
            "long_context_pool": None,
            "routing": {"policy": policy, **bound},
            "engine": engine,
            "deployment": {**text["deployment"], "num_replicas": args.replicas},
        }
        for pool, policy in POLICIES.items()
    ]
    return Catalog.model_validate({"platform": local.platform, "pools": pools})


def system_prompts(args: argparse.Namespace) -> list[str]:
    """One system prompt per tenant of about `--prefix-tokens` tokens (the model's tokenizer)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(CACHE_DIR / "models" / "phi-3.5-mini-tiny")
    prompts = []
    for tenant in range(args.tenants):
        rng = random.Random(f"{args.seed}-system-{tenant}")
        words = [f"You are the assistant of tenant {tenant}."]
        while len(tokenizer(" ".join(words)).input_ids) < args.prefix_tokens:
            words += rng.choices(WORDS, k=64)
        prompts.append(" ".join(words))
    return prompts


def round_workload(args: argparse.Namespace, label: str) -> list[tuple[int, str]]:
    """(tenant, user turn) for one round: tenants evenly, shuffled, turns of 20-60 words."""
    rng = random.Random(f"{args.seed}-{label}")
    tenants = [i % args.tenants for i in range(args.requests)]
    rng.shuffle(tenants)
    return [(t, " ".join(rng.choices(WORDS, k=rng.randint(20, 60))) + "?") for t in tenants]


def create_tenants(base: str, count: int) -> list[str]:
    import httpx

    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    keys = []
    for i in range(count):
        tenant = f"bench-tenant-{i}"
        httpx.post(f"{base}/admin/tenants", json={"id": tenant}, headers=admin).raise_for_status()
        resp = httpx.post(f"{base}/admin/tenants/{tenant}/keys", json={}, headers=admin)
        resp.raise_for_status()
        keys.append(resp.json()["key"])
    return keys


async def one_request(
    session: aiohttp.ClientSession,
    base: str,
    pool: str,
    tenant: int,
    key: str,
    messages: list[dict[str, str]],
    max_tokens: int,
) -> Sample:
    body = {
        "model": pool,
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"authorization": f"Bearer {key}"}
    t0, first, usage = time.perf_counter(), None, None
    async with session.post(f"{base}/v1/chat/completions", json=body, headers=headers) as resp:
        if resp.status != 200:
            raise RuntimeError(f"{pool}: HTTP {resp.status}: {await resp.text()}")
        async for data in sse_data(resp.content):
            chunk = json.loads(data)
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - t0
            if chunk.get("usage"):
                usage = chunk["usage"]
    assert usage is not None, "no usage chunk (stream_options.include_usage)"
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return Sample(pool, tenant, first, usage["prompt_tokens"], cached)


async def run_round(
    base: str,
    keys: list[str],
    pool: str,
    prompts: list[str],
    work: list[tuple[int, str]],
    args: argparse.Namespace,
) -> list[Sample]:
    queue: asyncio.Queue[tuple[int, str]] = asyncio.Queue()
    for item in work:
        queue.put_nowait(item)
    samples: list[Sample] = []
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def worker() -> None:
            while not queue.empty():
                tenant, user = queue.get_nowait()
                messages = [{"role": "system", "content": prompts[tenant]}, {"role": "user", "content": user}]
                sample = await one_request(
                    session, base, pool, tenant, keys[tenant], messages, args.max_tokens
                )
                samples.append(sample)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    return samples


Counts = dict[str, dict[str, float]]


def scrape(metrics_port: int) -> tuple[dict[str, Counts], Counts]:
    """vLLM's prefix cache counters by pool and replica ({"hits", "queries"}), and the router's
    decisions by pool and route, from Ray's metrics export port."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as resp:
        text = resp.read().decode()
    cache: dict[str, Counts] = defaultdict(lambda: defaultdict(lambda: {"hits": 0.0, "queries": 0.0}))
    routed: Counts = defaultdict(dict)
    counters = {"ray_vllm_prefix_cache_hits_total": "hits", "ray_vllm_prefix_cache_queries_total": "queries"}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in counters:
                cache[s.labels["model_name"]][s.labels.get("ReplicaId", "?")][counters[s.name]] += s.value
            elif s.name == "ray_phiserve_pool_routed_total":
                by_route = routed[s.labels["pool"]]
                by_route[s.labels["route"]] = by_route.get(s.labels["route"], 0.0) + s.value
    return dict(cache), dict(routed)


def scrape_settled(metrics_port: int, prompt_tokens: dict[str, int]) -> tuple[dict[str, Counts], Counts]:
    """Poll until vLLM's queries reach the prompt tokens the client saw per pool (the agent
    reports every few seconds), with a deadline; the last scrape either way."""
    deadline = time.monotonic() + 60
    while True:
        cache, routed = scrape(metrics_port)
        settled = all(
            sum(r["queries"] for r in cache.get(p, {}).values()) >= n for p, n in prompt_tokens.items()
        )
        if settled or time.monotonic() > deadline:
            return cache, routed
        time.sleep(1)


def hit_rate(samples: list[Sample]) -> float:
    return sum(s.cached_tokens for s in samples) / max(1, sum(s.prompt_tokens for s in samples))


def ttft_p50(samples: list[Sample]) -> float:
    return pct([s.ttft_s for s in samples if s.ttft_s is not None], 0.5) or 0.0


def report(
    args: argparse.Namespace,
    measured: dict[str, list[Sample]],
    metrics_port: int,
    every: dict[str, list[Sample]],
) -> None:
    print(
        f"\n{'pool':<17}{'hit rate':>9}  TTFT ms: {'p50':>7}{'p90':>8}{'cached p50':>12}{'uncached p50':>14}"
    )
    for pool, samples in measured.items():
        hit = [s for s in samples if s.cached_tokens >= s.prompt_tokens // 2]
        miss = [s for s in samples if s.cached_tokens < s.prompt_tokens // 2]
        ttfts = [s.ttft_s for s in samples if s.ttft_s is not None]
        print(
            f"{pool:<17}{hit_rate(samples):>9.3f}{'':>11}{ttft_p50(samples):>7.1f}{pct(ttfts, 0.9) or 0:>8.1f}"
            f"{ttft_p50(hit):>12.1f}{ttft_p50(miss):>14.1f}   {len(samples)} requests, {len(hit)} with "
            f"their prefix cached, {len(samples) - len(ttfts)} without text"
        )
    prompt_tokens = {pool: sum(s.prompt_tokens for s in samples) for pool, samples in every.items()}
    cache, routed = scrape_settled(metrics_port, prompt_tokens)
    print("\nvLLM's counters, whole run (warm-up included), against the requests' own counts:")
    for pool, samples in every.items():
        replicas = cache.get(pool, {})
        hits, queries = (sum(r[k] for r in replicas.values()) for k in ("hits", "queries"))
        print(
            f"  {pool:<17} vLLM hits/queries {hits:.0f}/{queries:.0f} = {hits / max(queries, 1):.3f}; "
            f"usage cached/prompt {sum(s.cached_tokens for s in samples)}/{prompt_tokens[pool]} "
            f"= {hit_rate(samples):.3f}"
        )
        # How the pool's prompt tokens spread over its replicas, and each one's hit rate.
        for replica, r in sorted(replicas.items()):
            print(
                f"    replica {replica[-8:]}: {r['queries'] / max(queries, 1):.0%} of the prompt tokens, "
                f"hit rate {r['hits'] / max(r['queries'], 1):.3f}"
            )
        by_tenant: dict[int, list[Sample]] = defaultdict(list)
        for sample in measured[pool]:
            by_tenant[sample.tenant].append(sample)
        rates = " ".join(f"{t}:{hit_rate(by_tenant[t]):.2f}" for t in sorted(by_tenant))
        print(f"    hit rate per tenant (measured rounds): {rates}")
    for pool in POLICIES:
        print(f"  router decisions of {pool}: {routed.get(pool) or 'none counted (Serve default router)'}")
    if not routed.get("prefix-affinity"):
        print(
            "  NOTE: prefix-affinity counted no router decision: phiserve's router is not wired in this tree."
        )
    default, affinity = measured["least-loaded"], measured["prefix-affinity"]
    hit_ratio = hit_rate(affinity) / max(hit_rate(default), 1e-9)
    ttft_ratio = ttft_p50(affinity) / max(ttft_p50(default), 1e-9)
    print(f"RESULT prefix_routing hit_rate_ratio={hit_ratio:.3f} ttft_p50_ratio={ttft_ratio:.3f}")


def main() -> None:
    args = parse_args()
    from pydantic import SecretStr

    from services.local.redis_server import LocalRedis
    from services.local.tiny_models import build_tiny_models
    from services.settings import Settings

    build_tiny_models(CACHE_DIR / "models")
    catalog = bench_catalog(args)
    prompts = system_prompts(args)
    tmp = Path(tempfile.mkdtemp(prefix="prefix-routing-"))
    redis = LocalRedis(port=free_port(), directory=tmp / "redis")
    redis.start(appendonly=False)
    port, metrics_port = free_port(), free_port()
    settings = Settings(
        port=port,
        grpc_port=None,
        cache_dir=CACHE_DIR,
        redis_url=redis.url,
        admin_key=SecretStr(ADMIN_KEY),
        batch_workers=0,
        files_dir=tmp / "files",
        queue_timeout_s=300.0,
    )
    kv = catalog.pools[0].engine.kv_cache_memory_bytes
    print(
        f"{args.tenants} tenants x ~{args.prefix_tokens}-token system prompts; {len(POLICIES)} pools x "
        f"{args.replicas} replicas, KV {kv / 2**20:.1f} MiB per replica (~{args.cache_tenants:g} prompts); "
        f"{args.requests} requests per round, concurrency {args.concurrency}, max_tokens {args.max_tokens}"
    )
    measured: dict[str, list[Sample]] = {pool: [] for pool in POLICIES}
    every: dict[str, list[Sample]] = {pool: [] for pool in POLICIES}
    try:
        with serve_session(
            port, _metrics_export_port=metrics_port, _system_config={"metrics_report_interval_ms": 2000}
        ):
            base = deploy(settings, catalog, timeout_s=900)
            keys = create_tenants(base, args.tenants)
            for index in range(args.rounds + 1):
                order = list(POLICIES) if index % 2 == 0 else list(reversed(POLICIES))
                for pool in order:
                    work = round_workload(args, f"round-{index}")  # the same turns for both pools
                    t0 = time.perf_counter()
                    samples = asyncio.run(run_round(base, keys, pool, prompts, work, args))
                    every[pool] += samples
                    label = "warm-up" if index == 0 else f"round {index}"
                    if index > 0:
                        measured[pool] += samples
                    print(
                        f"{label:<8} {pool:<16} {time.perf_counter() - t0:6.1f} s  hit rate {hit_rate(samples):.3f}  "
                        f"TTFT p50 {ttft_p50(samples):7.1f} ms",
                        flush=True,
                    )
            report(args, measured, metrics_port, every)
    finally:
        redis.stop()


if __name__ == "__main__":
    main()
