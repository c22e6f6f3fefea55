"""Running a generation through the tenant gate and a pool, unary or streamed.

Chat and completions (and REST and gRPC) differ only in their shapes, which a
`ResponseShape` supplies; the plumbing (the gate, prefetching the first chunk so errors
keep their status, usage, settlement however the stream ends) is shared here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

from services.catalog.models import PoolConfig
from services.errors import GenerationFailed, PhiserveError
from services.inference.gate import Admitted, TenantGate
from services.inference.metrics import GatewayMetrics
from services.inference.protocol.responses import Usage, usage
from services.inference.router import PoolRouter
from services.pools.engine import GenerationChunk, GenerationRequest, GenerationResult
from services.tenancy.cache_salt import CacheSalts
from services.tenancy.models import Tenant

logger = logging.getLogger(__name__)


R_co = TypeVar("R_co", covariant=True)
C_co = TypeVar("C_co", covariant=True)
R = TypeVar("R")
C = TypeVar("C")


class ResponseShape(Protocol[R_co, C_co]):
    """Shapes results for one API surface: the response body `R_co` and each stream chunk
    `C_co` (the typed dicts of services/inference/protocol/responses.py; every transport
    converts from those)."""

    def response(self, result: GenerationResult) -> R_co: ...

    def chunk(self, piece: GenerationChunk, totals: Usage | None = None) -> C_co:
        """One choice's delta; `totals`: the running usage, with `continuous_usage_stats`.
        A shape is made per request and knows each choice's first chunk itself."""
        ...

    def usage_chunk(self, usage: Usage) -> C_co: ...


__all__ = ["Caller", "GenerationRunner", "GenerationStream", "ResponseShape", "usage"]


@dataclass(frozen=True)
class Caller:
    """Who is asking: the authenticated tenant, the client's own deadline if sent, when the
    request arrived, and the metric labels the middleware records the response under."""

    tenant: Tenant
    deadline_s: float | None = None
    started: float = field(default_factory=time.perf_counter)
    labels: dict[str, str] = field(default_factory=dict)


class GenerationStream:
    """The shaped chunks of one admitted generation; closing it always settles.

    An async generator closed before its first `__anext__` never runs its `finally`: a
    client gone between `open_stream` and the first chunk (a gRPC call cancelled at
    `send_headers`, an SSE body never started) used to keep its concurrency lease and pool
    slot, renewed by the lease keeper for as long as the gateway lived (issue 9, item 3).
    Here `aclose()` settles an unstarted stream itself, and one dropped without being
    closed is settled when it is garbage-collected (a started one is closed by asyncio's
    async-generator finalizer, which runs the generator's `finally`)."""

    def __init__(
        self,
        payloads: AsyncGenerator[Any, None],
        settle_unstarted: Callable[[], Coroutine[Any, Any, None]],
        background: set[asyncio.Task[None]],
    ) -> None:
        self._payloads = payloads
        self._settle_unstarted = settle_unstarted
        self._background = background
        self._loop = asyncio.get_running_loop()
        self._started = False
        self._closed = False

    def __aiter__(self) -> GenerationStream:
        return self

    async def __anext__(self) -> Any:
        self._started = True
        return await self._payloads.__anext__()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self._payloads.aclose()  # runs its `finally` (settles) if it had started
        if not self._started:
            await asyncio.shield(self._settle_unstarted())

    def __del__(self) -> None:
        if self._closed or self._started or self._loop.is_closed():
            return
        settle, background, loop = self._settle_unstarted, self._background, self._loop

        def spawn() -> None:
            task = loop.create_task(settle())
            background.add(task)  # held until done: the loop keeps only weak references
            task.add_done_callback(background.discard)

        loop.call_soon_threadsafe(spawn)


class GenerationRunner:
    def __init__(
        self,
        router: PoolRouter,
        gate: TenantGate,
        metrics: GatewayMetrics,
        *,
        cache_salts: CacheSalts | None = None,
    ) -> None:
        self._router = router
        self._gate = gate
        self._metrics = metrics
        self._settling: set[asyncio.Task[None]] = set()  # streams dropped unstarted
        # Never unsalted: without a configured secret, a per-process one still isolates.
        self._cache_salts = cache_salts or CacheSalts.ephemeral()

    def _salted(self, caller: Caller, request: GenerationRequest) -> GenerationRequest:
        """The tenant's own prefix-cache salt, set here for every path (REST, gRPC, batch)."""
        return replace(request, cache_salt=self._cache_salts.for_tenant(caller.tenant.id))

    async def complete(
        self, caller: Caller, pool: PoolConfig, request: GenerationRequest, shape: ResponseShape[R, C]
    ) -> tuple[R, dict[str, str]]:
        caller.labels["model"] = pool.served_names[0]
        request = self._salted(caller, request)
        admitted = await self._gate.enter(caller.tenant, pool, request, deadline_s=caller.deadline_s)
        try:
            result = await self._router.generate(admitted.pool, admitted.request)
        except BaseException as exc:
            await self._gate.leave_failed(admitted, exc)  # no usage reported: see leave_failed
            raise
        await self._gate.leave(
            admitted,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
            cached_tokens=result.cached_tokens,
        )
        return shape.response(result), admitted.headers

    async def collect(
        self, caller: Caller, pool: PoolConfig, request: GenerationRequest, shape: ResponseShape[R, C]
    ) -> tuple[R, dict[str, str]]:
        """A unary answer assembled from the pool's stream (gRPC's Chat and Complete).

        Unlike `complete`, a caller that leaves mid-generation (a gRPC deadline) closes the
        stream, which aborts the engine request at once and bills the tokens generated so
        far (docs/grpc.md, "Unary calls run on the runner's stream"). The engine's own
        `complete()` is the concatenation of its stream: the body is the same as `complete`'s.
        """
        stream, headers = await self.open_stream(caller, pool, request, _Pieces(), include_usage=False)
        pieces: list[GenerationChunk] = []
        try:
            async for piece in stream:
                pieces.append(piece)
        finally:
            # Cancelled (deadline, client gone) or failed: abort the engine request, settle.
            await stream.aclose()  # type: ignore[attr-defined]  # a GenerationStream: it closes
        return shape.response(GenerationResult.assemble(pieces)), headers

    async def open_stream(
        self,
        caller: Caller,
        pool: PoolConfig,
        request: GenerationRequest,
        shape: ResponseShape[R, C],
        *,
        include_usage: bool,
        continuous_usage: bool = False,
    ) -> tuple[AsyncIterator[C], dict[str, str]]:
        """Return the stream of shaped chunks; raises (so the caller still answers with a
        normal error status) if the first chunk fails. A failure after that is raised from
        the iterator; the transport (SSE, gRPC) renders it."""
        caller.labels["model"] = pool.served_names[0]
        request = self._salted(caller, request)
        admitted = await self._gate.enter(caller.tenant, pool, request, deadline_s=caller.deadline_s)
        chunks = self._router.stream(admitted.pool, admitted.request)
        try:
            first = await anext(chunks)
        except BaseException as exc:
            await self._gate.leave_failed(admitted, exc)
            if isinstance(exc, StopAsyncIteration):
                raise GenerationFailed("the engine produced no output") from None
            raise
        first_at = time.perf_counter()
        self._metrics.time_to_first_token.observe(
            first_at - caller.started, tags={"model": caller.labels["model"]}
        )
        payloads = self._payloads(
            admitted,
            first,
            chunks,
            shape,
            include_usage=include_usage,
            continuous_usage=continuous_usage,
            first_at=first_at,
        )

        async def settle_unstarted() -> None:
            # What `_payloads`' finally does, for a stream closed before it ever ran.
            try:
                await chunks.aclose()
            finally:
                await self._gate.leave(
                    admitted,
                    prompt_tokens=first.prompt_tokens,
                    completion_tokens=first.completion_tokens,
                    cached_tokens=first.cached_tokens,
                )

        stream = GenerationStream(payloads, settle_unstarted, self._settling)
        return stream, admitted.headers

    async def _payloads(
        self,
        admitted: Admitted,
        first: GenerationChunk,
        chunks: AsyncGenerator[GenerationChunk, None],
        shape: ResponseShape[R, C],
        *,
        include_usage: bool,
        continuous_usage: bool,
        first_at: float,
    ) -> AsyncGenerator[C, None]:
        last = first

        def running(chunk: GenerationChunk) -> Usage | None:
            if not continuous_usage:
                return None
            return usage(chunk.prompt_tokens, chunk.completion_tokens, chunk.cached_tokens)

        try:
            yield shape.chunk(first, running(first))
            async for chunk in chunks:
                last = chunk
                yield shape.chunk(chunk, running(chunk))
            if include_usage:
                yield shape.usage_chunk(usage(last.prompt_tokens, last.completion_tokens, last.cached_tokens))
            if last.completion_tokens > first.completion_tokens:
                itl = (time.perf_counter() - first_at) / (last.completion_tokens - first.completion_tokens)
                self._metrics.inter_token_latency.observe(itl, tags={"model": admitted.model_name})
        except PhiserveError as exc:
            logger.warning(
                "request %s: stream failed after it started: %s", admitted.request.request_id, exc.message
            )
            raise
        finally:
            # Also on disconnect: settle what was generated and free the slot.
            await chunks.aclose()
            await self._gate.leave(
                admitted,
                prompt_tokens=last.prompt_tokens,
                completion_tokens=last.completion_tokens,
                cached_tokens=last.cached_tokens,
            )


class _Pieces:
    """The `ResponseShape` `collect` streams with: the engine's chunks as they are."""

    def response(self, result: GenerationResult) -> GenerationResult:
        return result

    def chunk(self, piece: GenerationChunk, totals: Usage | None = None) -> GenerationChunk:
        return piece

    def usage_chunk(self, usage: Usage) -> GenerationChunk:
        raise AssertionError("collect streams without include_usage")
