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
        self._engine = engine_factory(pool, model_path)
        await self._engine.start()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return await self._engine.complete(request)

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream coalesced deltas, one pending delta per choice. The first one goes out at
        once (time to first token)."""
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
            if chunk.finish_reason or now - last_sent >= self._coalesce_interval_s:
                for held in _with_latest_totals(pending, chunk):
                    yield held
                pending.clear()
                last_sent = now
        for held in _with_latest_totals(pending, latest):
            yield held

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
