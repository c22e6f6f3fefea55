"""Tenants' LoRA adapters on one pool (issue 14): throughput with 8 adapters in rotation against
the base model alone, and the first request's latency (TTFT) of a cold adapter against a warm
one, in one run.

Setup: one pool replica of the local profile's text pool (the tiny Phi-3.5-mini on vLLM's CPU
backend), in-process: a real `PoolReplica` (services/pools/deployment.py) with its real
`VLLMEngine`, the adapter files validated as in production, and its adapter cache (outside
Serve the replica keeps Serve's multiplexing LRU contract in `LocalMultiplexer`). No Ray, no
gateway: what is measured is the engine and the replica, not the handle hop, which is the
same for base and adapter requests. The 8 tiny adapters (services/local/tiny_adapters.py) are
rank 8 on all four Phi-3 modules.

Throughput: `--requests` (32) completions of `--max-tokens` (32) tokens (ignore_eos), varied
prompts, `--concurrency` (16) at a time; the base phase sends no adapter, the adapter phase
sends request n with adapter n mod 8. `--rounds` (4) rounds, in ABBA order (base then adapters,
then adapters then base, ...): the machine's speed drifts by tens of percent from minute to
minute here, and ABBA cancels a steady drift; each round's ratio is printed to show the
spread. Each adapter phase starts with all 8 loaded (one request each, not counted), so it
measures mixing adapters in the engine's steps (`--max-loras` per step, 2 in the local
profile), not loading them. `--max-cpu-loras` (8) is what the replica keeps: below 8 the
rotation also reloads adapters (thrashing).

Cold vs warm: for each of the 8 adapters, under a version never loaded (a new registration:
a new multiplexing key), one streamed request of 1 token (the cold one: validation of the
files, vLLM's add_lora, then prefill), then the same request again (warm). Ratio of medians.

    .venv/bin/python benchmarks/lora.py [--requests 32] [--concurrency 16] [--rounds 4]
        [--max-loras 2] [--max-cpu-loras 8]

Ends with RESULT lora multi_adapter_tps_ratio=X cold_ttft_ratio=Y
(adapters / base tokens per second; cold / warm TTFT p50).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from _common import CACHE_DIR, REPO, pct

sys.path.insert(0, str(REPO))

ADAPTERS = 8
WORDS = [
    "river",
    "stone",
    "maple",
    "copper",
    "violet",
    "harbor",
    "signal",
    "lantern",
    "meadow",
    "quartz",
    "ember",
    "falcon",
]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=32, help="requests per throughput phase")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=4, help="rounds of a base and an adapter phase (ABBA)")
    p.add_argument("--max-loras", type=int, default=2, help="adapters one engine step may mix")
    p.add_argument("--max-cpu-loras", type=int, default=8, help="adapters the replica keeps")
    return p.parse_args()


def prompt(n: int) -> str:
    words = " ".join(WORDS[(n * 7 + i) % len(WORDS)] for i in range(12))
    return f"# note {n}: {words}\ndef step_{n}(values):\n    return"


def request(n: int, adapter: Any, *, max_tokens: int) -> Any:
    from services.pools.engine import GenerationRequest, SamplingOptions

    return GenerationRequest(
        request_id=f"lora-{n}",
        model="phi-3.5-mini",
        sampling=SamplingOptions(max_tokens=max_tokens, temperature=0.0, ignore_eos=True),
        prompts=(prompt(n),),
        adapter=adapter,
    )


def adapter_refs(folders: dict[str, Path], version: str) -> list[Any]:
    from services.pools.engine import AdapterRef

    return [
        AdapterRef(
            model_id=f"ft:phi-3.5-mini:bench:{name.rsplit('/', 1)[-1]}", path=str(path), version=version
        )
        for name, path in sorted(folders.items())
    ][:ADAPTERS]


async def throughput(replica: Any, adapters: list[Any] | None, args: argparse.Namespace) -> float:
    """Completion tokens per second over `args.requests` requests, `args.concurrency` at a time."""
    gate = asyncio.Semaphore(args.concurrency)
    tokens = 0

    async def one(n: int) -> None:
        nonlocal tokens
        adapter = adapters[n % len(adapters)] if adapters else None
        async with gate:
            result = await replica.generate(request(n, adapter, max_tokens=args.max_tokens))
        tokens += result.completion_tokens

    start = time.perf_counter()
    await asyncio.gather(*(one(n) for n in range(args.requests)))
    return tokens / (time.perf_counter() - start)


async def ttft(replica: Any, adapter: Any, n: int) -> float:
    start = time.perf_counter()
    async for _ in replica.generate_stream(request(n, adapter, max_tokens=1)):
        return time.perf_counter() - start
    raise AssertionError("the stream ended without a chunk")


async def run(replica: Any, folders: dict[str, Path], args: argparse.Namespace) -> tuple[float, float]:
    warm_set = adapter_refs(folders, "bench")
    for i, adapter in enumerate(warm_set):  # load all 8 once; also warms the engine up
        await replica.generate(request(10_000 + i, adapter, max_tokens=2))
    await replica.generate(request(10_100, None, max_tokens=2))
    base_tps: list[float] = []
    lora_tps: list[float] = []
    for r in range(args.rounds):
        for phase in ("base", "lora") if r % 2 == 0 else ("lora", "base"):
            if phase == "base":
                base_tps.append(await throughput(replica, None, args))
                continue
            for i, adapter in enumerate(warm_set):  # all 8 loaded before the phase (LRU refresh)
                await replica.generate(request(20_000 + r * 10 + i, adapter, max_tokens=1))
            lora_tps.append(await throughput(replica, warm_set, args))
        print(
            f"round {r + 1}: base {base_tps[-1]:7.1f} tok/s   8 adapters {lora_tps[-1]:7.1f} tok/s   "
            f"ratio {lora_tps[-1] / base_tps[-1]:.3f}",
            flush=True,
        )
    cold: list[float] = []
    warm: list[float] = []
    for i, adapter in enumerate(adapter_refs(folders, uuid.uuid4().hex[:8])):
        cold.append(await ttft(replica, adapter, 30_000 + i))
        warm.append(await ttft(replica, adapter, 30_000 + i))
    stats = replica.adapter_stats()
    print(
        f"TTFT ms, 1-token stream, {len(cold)} adapters: cold p50 {pct(cold, 0.5):.1f} "
        f"(min {1e3 * min(cold):.1f}, max {1e3 * max(cold):.1f}); warm p50 {pct(warm, 0.5):.1f} "
        f"(min {1e3 * min(warm):.1f}, max {1e3 * max(warm):.1f})"
    )
    print(
        f"replica adapter cache: {stats['loads']} loads, {stats['evictions']} evictions, "
        f"{len(stats['loaded'])} kept of {stats['capacity']}"
    )
    tps_ratio = sum(lora_tps) / sum(base_tps)
    cold_ratio = statistics.median(cold) / statistics.median(warm)
    return tps_ratio, cold_ratio


async def main_async(args: argparse.Namespace) -> None:
    from services.app import CPU_ENGINE_ENV
    from services.catalog.loader import load_catalog
    from services.catalog.models import EngineConfig
    from services.local.tiny_adapters import build_tiny_adapters
    from services.local.tiny_models import build_tiny_models
    from services.pools.deployment import PoolReplica

    os.environ.update(CPU_ENGINE_ENV)  # what a pool replica's runtime_env sets
    models = build_tiny_models(CACHE_DIR / "models")
    folders = build_tiny_adapters(CACHE_DIR / "adapters", CACHE_DIR / "models")
    text = next(p for p in load_catalog("local").pools if p.name == "text")
    engine = EngineConfig.model_validate(
        {**text.engine.model_dump(), "max_loras": args.max_loras, "max_cpu_loras": args.max_cpu_loras}
    )
    pool = text.model_copy(update={"engine": engine, "long_context_pool": None})
    print(
        f"one in-process pool replica (tiny Phi-3.5-mini, vLLM CPU), max_loras {engine.max_loras}, "
        f"max_cpu_loras {engine.max_cpu_loras}, max_lora_rank {engine.max_lora_rank}; {args.requests} "
        f"requests x {args.max_tokens} tokens, concurrency {args.concurrency}, {args.rounds} rounds",
        flush=True,
    )
    replica = PoolReplica.__new__(PoolReplica)
    start = time.perf_counter()
    await replica.__init__(pool.for_replica(), str(models["phi-3.5-mini-tiny"]))  # type: ignore[misc]
    print(f"engine started in {time.perf_counter() - start:.1f} s", flush=True)
    try:
        tps_ratio, cold_ratio = await run(replica, folders, args)
    finally:
        replica._engine.shutdown()
    print(f"RESULT lora multi_adapter_tps_ratio={tps_ratio:.3f} cold_ttft_ratio={cold_ratio:.3f}")


def main() -> None:
    asyncio.run(main_async(parse_args()))


if __name__ == "__main__":
    main()
