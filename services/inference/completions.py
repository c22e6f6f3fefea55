"""Legacy completions: one prompt, routed to its pool, in OpenAI's text_completion shape."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import cast

from services.catalog.models import Platform, PoolConfig
from services.errors import InvalidRequest
from services.inference.generation import Caller, GenerationRunner
from services.inference.protocol.completions import CompletionRequest
from services.inference.protocol.responses import (
    Completion,
    CompletionChunk,
    FinishReason,
    Usage,
    usage,
)
from services.inference.router import PoolRouter
from services.inference.sampling import sampling_options
from services.pools.engine import GenerationRequest, GenerationResult


class CompletionShape:
    """OpenAI's text_completion objects; `response_id` is the server's (see `ChatShape`)."""

    def __init__(self, response_id: str, model: str, *, echo_prefix: str = "") -> None:
        self._id = f"cmpl-{response_id}"
        self._model = model
        self._created = int(time.time())
        self._echo_prefix = echo_prefix

    def response(self, result: GenerationResult) -> Completion:
        return {
            "id": self._id,
            "object": "text_completion",
            "created": self._created,
            "model": self._model,
            "choices": [
                {
                    "index": 0,
                    "text": self._echo_prefix + result.text,
                    "logprobs": None,
                    "finish_reason": cast(FinishReason, result.finish_reason),
                }
            ],
            "usage": usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens),
        }

    def chunk(self, text: str, finish_reason: str | None, *, first: bool) -> CompletionChunk:
        if first:
            text = self._echo_prefix + text
        return {
            "id": self._id,
            "object": "text_completion",
            "created": self._created,
            "model": self._model,
            "choices": [
                {
                    "index": 0,
                    "text": text,
                    "logprobs": None,
                    "finish_reason": cast("FinishReason | None", finish_reason),
                }
            ],
        }

    def usage_chunk(self, totals: Usage) -> CompletionChunk:
        return {
            "id": self._id,
            "object": "text_completion",
            "created": self._created,
            "model": self._model,
            "choices": [],
            "usage": totals,
        }


class CompletionService:
    def __init__(self, router: PoolRouter, runner: GenerationRunner, *, platform: Platform) -> None:
        self._router = router
        self._runner = runner
        self._platform = platform

    def prepare(
        self, body: CompletionRequest, request_id: str, *, response_id: str | None = None
    ) -> tuple[PoolConfig, GenerationRequest, CompletionShape]:
        """`request_id` is the client's (logs only); the response id is `response_id` (a
        batch line's) or a fresh one."""
        pool = self._router.resolve(body.model)
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise InvalidRequest("only one prompt per request is supported", param="prompt")
            prompt = prompt[0]
        if not prompt:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        request = GenerationRequest(
            request_id=request_id,
            model=body.model,
            sampling=sampling_options(body, pool, self._platform),
            prompt=prompt,
        )
        shape = CompletionShape(
            response_id or uuid.uuid4().hex, body.model, echo_prefix=prompt if body.echo else ""
        )
        return pool, request, shape

    async def create(
        self, caller: Caller, body: CompletionRequest, request_id: str, *, from_stream: bool = False
    ) -> tuple[Completion, dict[str, str]]:
        """`from_stream`: assembled from the pool's stream (`GenerationRunner.collect`)."""
        pool, request, shape = self.prepare(body, request_id)
        if from_stream:
            return await self._runner.collect(caller, pool, request, shape)
        return await self._runner.complete(caller, pool, request, shape)

    async def create_stream(
        self, caller: Caller, body: CompletionRequest, request_id: str
    ) -> tuple[AsyncIterator[CompletionChunk], dict[str, str]]:
        pool, request, shape = self.prepare(body, request_id)
        return await self._runner.open_stream(
            caller, pool, request, shape, include_usage=body.include_usage()
        )
