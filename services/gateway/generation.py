"""Running a generation through a pool, unary or as Server-Sent Events.

Chat and completions differ only in their JSON shapes, which a `ResponseShape`
supplies; the plumbing (prefetching the first chunk so errors keep their status,
usage, `[DONE]`, errors after the stream started) is shared here.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any, Protocol

from services.catalog.models import PoolConfig
from services.errors import GenerationFailed, PhiserveError
from services.gateway.errors import sse_error_event
from services.gateway.pools import PoolRouter
from services.pools.engine import GenerationChunk, GenerationRequest, GenerationResult

logger = logging.getLogger(__name__)

DONE_EVENT = "data: [DONE]\n\n"


class ResponseShape(Protocol):
    def response(self, result: GenerationResult) -> dict[str, Any]: ...

    def chunk(self, text: str, finish_reason: str | None, *, first: bool) -> dict[str, Any]: ...

    def usage_chunk(self, usage: dict[str, int]) -> dict[str, Any]: ...


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _event(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


class GenerationRunner:
    def __init__(self, router: PoolRouter) -> None:
        self._router = router

    async def complete(self, pool: PoolConfig, request: GenerationRequest, shape: ResponseShape) -> dict[str, Any]:
        result = await self._router.generate(pool, request)
        return shape.response(result)

    async def open_stream(
        self,
        pool: PoolConfig,
        request: GenerationRequest,
        shape: ResponseShape,
        *,
        include_usage: bool,
    ) -> AsyncIterator[str]:
        """Return the SSE events; raises (as a normal error response) if the first chunk fails."""
        chunks = self._router.stream(pool, request)
        try:
            first = await anext(chunks)
        except StopAsyncIteration:
            raise GenerationFailed("the engine produced no output") from None
        return self._events(first, chunks, shape, include_usage=include_usage, request_id=request.request_id)

    async def _events(
        self,
        first: GenerationChunk,
        chunks: AsyncIterator[GenerationChunk],
        shape: ResponseShape,
        *,
        include_usage: bool,
        request_id: str,
    ) -> AsyncIterator[str]:
        last = first
        try:
            yield _event(shape.chunk(first.text, first.finish_reason, first=True))
            async for chunk in chunks:
                last = chunk
                yield _event(shape.chunk(chunk.text, chunk.finish_reason, first=False))
            if include_usage:
                yield _event(shape.usage_chunk(usage(last.prompt_tokens, last.completion_tokens)))
        except PhiserveError as exc:
            logger.warning("request %s: stream failed after it started: %s", request_id, exc.message)
            yield sse_error_event(exc)
        finally:
            await chunks.aclose()  # type: ignore[attr-defined]
        yield DONE_EVENT
