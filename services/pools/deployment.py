"""A model pool replica: one Ray Serve replica embedding one engine.

The builder in `services.app` turns `PoolReplica` into one deployment per catalog
pool (`serve.deployment(PoolReplica, name="pool-<name>", ...)`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable

from services.catalog.models import PoolConfig
from services.pools.engine import Engine, GenerationChunk, GenerationRequest, GenerationResult
from services.pools.vllm_engine import VLLMEngine

logger = logging.getLogger(__name__)

EngineFactory = Callable[[PoolConfig, str], Engine]

# Every streamed item is a Ray message costing CPU on both ends; sending the
# deltas of ~20 ms together keeps streaming throughput close to the engine's.
DEFAULT_COALESCE_INTERVAL_S = 0.02
# A message costs about the same CPU whatever it carries (~0.5 CPU-ms over the pool replica,
# the gateway replica and the HTTP front door, measured by benchmarks/streaming.py with
# throughput-optimized Serve), so the replica's message rate, not each stream's, is what to
# bound: beyond this many concurrent streams the interval grows with their number (16
# streams: 2x), up to MAX_COALESCE_FACTOR times. One stream keeps 20 ms deltas; the first
# delta of every stream still goes out at once (time to first token).
COALESCE_STREAMS_AT_BASE = 8
MAX_COALESCE_FACTOR = 5.0


def coalesce_interval(base_s: float, active_streams: int) -> float:
    """The interval between two messages of one stream when `active_streams` are open."""
    return base_s * min(MAX_COALESCE_FACTOR, max(1.0, active_streams / COALESCE_STREAMS_AT_BASE))


def vllm_engine_factory(pool: PoolConfig, model_path: str) -> Engine:
    return VLLMEngine(pool, model_path=model_path)


class PoolReplica:
    """Serves one pool's model. Called by the gateway through a DeploymentHandle."""

    async def __init__(  # type: ignore[misc]  # Serve awaits async constructors
        self,
        pool: PoolConfig,
        model_path: str,
        *,
        engine_factory: EngineFactory = vllm_engine_factory,
        coalesce_interval_s: float = DEFAULT_COALESCE_INTERVAL_S,
    ) -> None:
        logging.basicConfig(level=logging.INFO)
        self._pool = pool
        self._coalesce_interval_s = coalesce_interval_s
        self._active_streams = 0
        self._engine = engine_factory(pool, model_path)
        await self._engine.start()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return await self._engine.complete(request)

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream coalesced deltas, one pending delta per choice. The first one goes out at
        once (time to first token)."""
        self._active_streams += 1
        try:
            if request.choice_count == 1:
                async for chunk in self._one_choice(request):
                    yield chunk
                return
            pending: dict[int, GenerationChunk] = {}
            last_sent = 0.0
            latest: GenerationChunk | None = None
            async for chunk in self._engine.stream(request):
                latest = chunk
                held = pending.get(chunk.index)
                if held is None:
                    pending[chunk.index] = chunk
                else:
                    held.merge(chunk)
                now = time.monotonic()
                if chunk.finish_reason or now - last_sent >= self._interval():
                    for held in _with_latest_totals(pending, chunk):
                        yield held
                    pending.clear()
                    last_sent = now
            for held in _with_latest_totals(pending, latest):
                yield held
        finally:
            self._active_streams -= 1

    async def _one_choice(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """`generate_stream` for one choice: the held delta is the latest (its totals are the
        request's), so no per-choice bookkeeping per engine step."""
        held: GenerationChunk | None = None
        last_sent = 0.0
        async for chunk in self._engine.stream(request):
            if held is None:
                held = chunk
            else:
                held.merge(chunk)
            now = time.monotonic()
            if chunk.finish_reason or now - last_sent >= self._interval():
                yield held
                held = None
                last_sent = now
        if held is not None:
            yield held

    def _interval(self) -> float:
        return coalesce_interval(self._coalesce_interval_s, self._active_streams)

    async def check_health(self) -> None:
        """Serve's health hook: raising marks this replica unhealthy and replaces it."""
        await self._engine.check_health()

    async def ready(self) -> str:
        """Answered by any live replica; the gateway's /ready asks each pool."""
        await self._engine.check_health()
        return self._pool.name

    async def diagnostics(self) -> dict[str, object]:
        """For operators and tests: this replica's process, its engine children, load."""
        import psutil

        me = psutil.Process()
        return {
            "pool": self._pool.name,
            "pid": me.pid,
            "engine_pids": [child.pid for child in me.children(recursive=True)],
            "num_unfinished": await self._engine.num_unfinished(),
            "max_model_len": self._pool.engine.max_model_len,
            "rope_scaling": await self._engine.rope_scaling(),
        }

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()


def _with_latest_totals(
    pending: dict[int, GenerationChunk], latest: GenerationChunk | None
) -> list[GenerationChunk]:
    """The held deltas in choice order, each with the request's latest running totals (the
    consumer reads the totals from whichever chunk comes last)."""
    held = [pending[i] for i in sorted(pending)]
    if latest is not None:
        for chunk in held:
            chunk.prompt_tokens = latest.prompt_tokens
            chunk.completion_tokens = latest.completion_tokens
            chunk.cached_tokens = latest.cached_tokens
    return held
