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
        """Stream coalesced deltas. The first one goes out at once (time to first token)."""
        pending: GenerationChunk | None = None
        last_sent = 0.0
        async for chunk in self._engine.stream(request):
            if pending is None:
                pending = chunk
            else:
                pending.text += chunk.text
                pending.completion_tokens = chunk.completion_tokens
                pending.cached_tokens = chunk.cached_tokens
                pending.finish_reason = chunk.finish_reason
            now = time.monotonic()
            if chunk.finish_reason or now - last_sent >= self._coalesce_interval_s:
                yield pending
                pending = None
                last_sent = now
        if pending is not None:
            yield pending

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
