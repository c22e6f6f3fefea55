"""A model pool replica: one Ray Serve replica embedding one engine.

The builder in `services.app` turns `PoolReplica` into one deployment per catalog
pool (`serve.deployment(PoolReplica, name="pool-<name>", ...)`).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextvars import ContextVar

from services.catalog.models import PoolConfig
from services.errors import GenerationFailed
from services.pools.adapter_cache import (
    AdapterCheck,
    AdapterSlots,
    CachedAdapter,
    LocalMultiplexer,
    adapter_key,
    adapters_not_served,
)
from services.pools.adapter_files import check_adapter_folder
from services.pools.engine import AdapterRef, Engine, GenerationChunk, GenerationRequest, GenerationResult
from services.pools.metrics import AdapterMetrics
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


# The adapter the running request asked for. Serve's multiplexer calls the loader with the
# key alone, in the request's own task, so the loader reads the rest (the folder) from here.
_REQUESTED_ADAPTER: ContextVar[AdapterRef | None] = ContextVar("phiserve_requested_adapter", default=None)


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
        adapter_check: AdapterCheck = check_adapter_folder,
        adapter_metrics: AdapterMetrics | None = None,
    ) -> None:
        logging.basicConfig(level=logging.INFO)
        self._pool = pool
        self._coalesce_interval_s = coalesce_interval_s
        self._active_streams = 0
        self._engine = engine_factory(pool, model_path)
        self._adapters: AdapterSlots | None = None
        self._load_adapter: Callable[[str], Awaitable[CachedAdapter]] | None = None
        if pool.engine.enable_lora:
            self._adapters = AdapterSlots(
                self._engine,
                pool=pool.name,
                base_model_path=model_path,
                max_rank=pool.engine.max_lora_rank,
                check=adapter_check,
                metrics=adapter_metrics if adapter_metrics is not None else AdapterMetrics(),
            )
            self._load_adapter = _multiplexer(self._adapters, pool.engine.adapters_per_replica)
        await self._engine.start()

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        if request.adapter is None:
            return await self._engine.complete(request)
        with await self._adapter_held(request.adapter):
            return await self._engine.complete(request)

    async def _adapter_held(self, adapter: AdapterRef) -> contextlib.AbstractContextManager[None]:
        """Load `adapter` through the multiplexer (a hit costs a dict lookup) and hold it for
        the request. Raises before the first chunk: `InvalidAdapter` for files that fail
        validation, `InvalidRequest` on a pool with LoRA off."""
        if self._adapters is None or self._load_adapter is None:
            raise adapters_not_served(self._pool.name)
        _REQUESTED_ADAPTER.set(adapter)
        cached = await self._load_adapter(adapter_key(adapter))
        return self._adapters.hold(cached)

    async def generate_stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        """Stream coalesced deltas, one pending delta per choice. The first one goes out at
        once (time to first token)."""
        adapter_hold = (
            contextlib.nullcontext() if request.adapter is None else await self._adapter_held(request.adapter)
        )
        self._active_streams += 1
        try:
            with adapter_hold:
                if request.choice_count == 1:
                    # Closed here, not when collected: the engine request ends (aborted when
                    # the client left) before the adapter hold is let go.
                    async with contextlib.aclosing(self._one_choice(request)) as chunks:
                        async for chunk in chunks:
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

    async def _one_choice(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
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

    def adapter_stats(self) -> dict[str, object]:
        """For tests and operators: this replica's adapter cache (keys carry adapter ids, so
        this is not a metric)."""
        slots = self._adapters
        if slots is None:
            return {"enabled": False}
        return {
            "enabled": True,
            "capacity": self._pool.engine.adapters_per_replica,
            "loaded": slots.loaded_keys,
            "loads": slots.loads,
            "load_failures": slots.load_failures,
            "evictions": slots.evictions,
        }

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()


def _multiplexer(slots: AdapterSlots, capacity: int) -> Callable[[str], Awaitable[CachedAdapter]]:
    """Serve's model multiplexing inside a Serve replica (per-pool capacity, hence applied
    here rather than as a class decorator); the same LRU outside Serve (tests/fakes,
    in-process benchmarks), where Serve's refuses to run without a replica context."""
    from ray import serve
    from ray.serve.exceptions import RayServeException

    async def load_adapter(key: str) -> CachedAdapter:
        adapter = _REQUESTED_ADAPTER.get()
        if adapter is None or adapter_key(adapter) != key:  # only ever called by _adapter_held
            raise GenerationFailed("adapter load without its request")
        return await slots.load(adapter)

    try:
        serve.get_replica_context()
    except RayServeException:
        return LocalMultiplexer(load_adapter, capacity)
    multiplexed: Callable[[str], Awaitable[CachedAdapter]] = serve.multiplexed(
        max_num_models_per_replica=capacity
    )(load_adapter)
    return multiplexed


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
