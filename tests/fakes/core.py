"""Small helpers for tests that drive the core (`Core` from `build_core`) in-process."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from services.catalog.models import Catalog
from services.inference.core import Core
from services.inference.usage_report import usage_report
from services.pools.engine import (
    ChatMessage,
    GenerationChunk,
    GenerationRequest,
    GenerationResult,
    SamplingOptions,
)


class PlainShape:
    """A `ResponseShape` that keeps what the runner hands it, unshaped: each chunk as
    (text, finish_reason, whether it is its choice's first)."""

    def __init__(self) -> None:
        self._started: set[int] = set()

    def response(self, result: GenerationResult) -> GenerationResult:
        return result

    def chunk(
        self, piece: GenerationChunk, totals: dict[str, Any] | None = None
    ) -> tuple[str, str | None, bool]:
        first = piece.index not in self._started
        self._started.add(piece.index)
        return piece.text, piece.finish_reason, first

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        return {"usage": usage}


def chat_request(
    text: str = "one two three", *, request_id: str = "req", model: str = "phi-3.5-mini", **sampling: Any
) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        model=model,
        sampling=SamplingOptions(**sampling),
        messages=(ChatMessage(role="user", text=text),),
    )


async def until(predicate: Callable[[], Any], *, timeout_s: float = 5.0, what: str = "condition") -> None:
    """Poll a condition (sync or async) until it holds, or fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return
        assert time.monotonic() < deadline, f"{what} not reached within {timeout_s} s"
        await asyncio.sleep(0.005)


async def queue_depth(core: Core, pool: str) -> tuple[int, int]:
    """(in flight, waiting) of a pool's fair queue, as every gateway replica sees it."""
    return await core.keeper._fair_queue.depth(pool)  # the keeper holds the replica's queue


async def billed(core: Core, tenant_id: str) -> tuple[int, int, int]:
    """(requests, prompt tokens, completion tokens) on the tenant's usage today."""
    report = await usage_report(core.usage, date=None, days=1, tenant_id=tenant_id)
    rows = report["data"]
    return (
        sum(int(row["requests"]) for row in rows),
        sum(int(row["prompt_tokens"]) for row in rows),
        sum(int(row["completion_tokens"]) for row in rows),
    )


def with_slots(catalog: Catalog, pool_name: str, slots: int) -> Catalog:
    """The catalog with one pool admitting `slots` requests at once (its fair-queue capacity)."""
    pools = [
        p.model_copy(update={"max_in_flight": slots}) if p.name == pool_name else p for p in catalog.pools
    ]
    return catalog.model_copy(update={"pools": pools})
