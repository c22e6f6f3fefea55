"""Legacy completions: prompts (text or token ids), routed to their pool, in OpenAI's
text_completion shape."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import cast

from services.catalog.models import Platform, PoolConfig
from services.errors import InvalidRequest
from services.inference.adapter_models import ModelResolver
from services.inference.generation import Caller, GenerationRunner
from services.inference.logprobs import completion_logprobs
from services.inference.protocol.completions import CompletionRequest
from services.inference.protocol.responses import (
    Completion,
    CompletionChoice,
    CompletionChunk,
    FinishReason,
    Usage,
    usage,
)
from services.inference.sampling import sampling_options
from services.inference.tokens import TokenCounter
from services.pools.engine import GenerationChunk, GenerationRequest, GenerationResult, Prompt
from services.tenancy.end_users import EndUserIds
from services.tenancy.models import Tenant


class CompletionShape:
    """OpenAI's text_completion objects; `response_id` is the server's (see `ChatShape`).

    `echo_prefixes`: with `echo`, each prompt's text, prepended to its choices' text
    (choice `i` belongs to prompt `i // n`)."""

    def __init__(
        self, response_id: str, model: str, *, echo_prefixes: list[str] | None = None, n: int = 1
    ) -> None:
        self._id = f"cmpl-{response_id}"
        self._model = model
        self._created = int(time.time())
        self._echo = echo_prefixes
        self._n = n
        self._offsets: dict[int, int] = {}  # each streamed choice's text so far, for text_offset

    def _prefix(self, index: int) -> str:
        return self._echo[index // self._n] if self._echo else ""

    def response(self, result: GenerationResult) -> Completion:
        choices: list[CompletionChoice] = []
        for choice in result.choices:
            prefix = self._prefix(choice.index)
            choices.append(
                {
                    "index": choice.index,
                    "text": prefix + choice.text,
                    "logprobs": completion_logprobs(choice.logprobs, len(prefix)),
                    "finish_reason": cast(FinishReason, choice.finish_reason),
                }
            )
        return {
            "id": self._id,
            "object": "text_completion",
            "created": self._created,
            "model": self._model,
            "choices": choices,
            "usage": usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens),
        }

    def chunk(self, piece: GenerationChunk, totals: Usage | None = None) -> CompletionChunk:
        text = piece.text
        if piece.index not in self._offsets:
            text = self._prefix(piece.index) + text
        offset = self._offsets.get(piece.index, 0)
        self._offsets[piece.index] = offset + len(text)
        body: CompletionChunk = {
            "id": self._id,
            "object": "text_completion",
            "created": self._created,
            "model": self._model,
            "choices": [
                {
                    "index": piece.index,
                    "text": text,
                    "logprobs": completion_logprobs(piece.logprobs, offset + len(text) - len(piece.text)),
                    "finish_reason": cast("FinishReason | None", piece.finish_reason),
                }
            ],
        }
        if totals is not None:
            body["usage"] = totals
        return body

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
    def __init__(
        self,
        models: ModelResolver,
        runner: GenerationRunner,
        tokens: TokenCounter,
        *,
        platform: Platform,
        end_users: EndUserIds | None = None,
    ) -> None:
        self._models = models
        self._runner = runner
        self._tokens = tokens
        self._platform = platform
        self._end_users = end_users or EndUserIds.from_secret(None)

    async def prepare(
        self,
        body: CompletionRequest,
        request_id: str,
        *,
        tenant: Tenant | None = None,
        response_id: str | None = None,
    ) -> tuple[PoolConfig, GenerationRequest, CompletionShape]:
        """`request_id` is the client's (logs only); the response id is `response_id` (a
        batch line's) or a fresh one. `tenant`: the caller, whose adapters `body.model` may
        name (none: plain model names only); its access is checked by the gate."""
        resolved = await self._models.resolve(body.model, tenant_id=tenant.id if tenant else None)
        pool = resolved.pool
        prompts = _prompts(body.prompt)
        echo = [self._echo_text(pool, p) for p in prompts] if body.echo else None
        request = GenerationRequest(
            request_id=request_id,
            model=body.model,
            sampling=sampling_options(body, pool, self._platform),
            prompts=prompts,
            end_user=self._end_users.digest(body.user),
            adapter=resolved.adapter,
        )
        shape = CompletionShape(response_id or uuid.uuid4().hex, body.model, echo_prefixes=echo, n=body.n)
        return pool, request, shape

    def _echo_text(self, pool: PoolConfig, prompt: Prompt) -> str:
        if isinstance(prompt, str):
            return prompt
        return self._tokens.decode(pool, prompt)

    async def create(
        self, caller: Caller, body: CompletionRequest, request_id: str, *, from_stream: bool = False
    ) -> tuple[Completion, dict[str, str]]:
        """`from_stream`: assembled from the pool's stream (`GenerationRunner.collect`)."""
        pool, request, shape = await self.prepare(body, request_id, tenant=caller.tenant)
        if from_stream:
            return await self._runner.collect(caller, pool, request, shape)
        return await self._runner.complete(caller, pool, request, shape)

    async def create_stream(
        self, caller: Caller, body: CompletionRequest, request_id: str
    ) -> tuple[AsyncIterator[CompletionChunk], dict[str, str]]:
        pool, request, shape = await self.prepare(body, request_id, tenant=caller.tenant)
        return await self._runner.open_stream(
            caller,
            pool,
            request,
            shape,
            include_usage=body.include_usage(),
            continuous_usage=body.continuous_usage(),
        )


# OpenAI's limit on the prompts of one request.
MAX_PROMPTS = 2048


def _prompts(prompt: str | list[str] | list[int] | list[list[int]]) -> tuple[Prompt, ...]:
    """The request's prompts, each text or token ids; none of them empty."""
    if isinstance(prompt, str):
        prompts: list[Prompt] = [prompt]
    elif prompt and isinstance(prompt[0], int):
        prompts = [tuple(prompt)]
    else:
        prompts = [p if isinstance(p, str) else tuple(p) for p in cast("list[str] | list[list[int]]", prompt)]
    if not prompts:
        raise InvalidRequest("prompt must not be empty", param="prompt")
    if len(prompts) > MAX_PROMPTS:
        raise InvalidRequest(f"at most {MAX_PROMPTS} prompts per request", param="prompt")
    for i, p in enumerate(prompts):
        if not p:
            raise InvalidRequest(
                "prompt must not be empty", param="prompt" if len(prompts) == 1 else f"prompt[{i}]"
            )
        if not isinstance(p, str) and min(p) < 0:
            raise InvalidRequest(
                "token ids are not negative", param="prompt" if len(prompts) == 1 else f"prompt[{i}]"
            )
    return tuple(prompts)
