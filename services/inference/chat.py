"""Chat completions: validate messages and images, route, shape OpenAI responses."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from typing import cast

from services.catalog.models import Modality, Platform, PoolConfig
from services.errors import InvalidRequest, UnsupportedContent
from services.inference.gate import check_access
from services.inference.generation import Caller, GenerationRunner
from services.inference.images import ImageLoader
from services.inference.protocol.chat import ChatCompletionRequest, ImagePart, TextPart
from services.inference.protocol.responses import (
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    FinishReason,
    Usage,
    usage,
)
from services.inference.router import PoolRouter
from services.inference.sampling import sampling_options
from services.pools.engine import ChatMessage, GenerationRequest, GenerationResult
from services.tenancy.models import Tenant


class ChatShape:
    """OpenAI's chat.completion objects. `response_id` is the server's (a fresh uuid, or
    a batch line's `<batch>-<line>`), never the client's x-request-id: two tenants sending
    the same x-request-id must not get the same response id (issue 9, item 1)."""

    def __init__(self, response_id: str, model: str) -> None:
        self._id = f"chatcmpl-{response_id}"
        self._model = model
        self._created = int(time.time())

    def response(self, result: GenerationResult) -> ChatCompletion:
        return {
            "id": self._id,
            "object": "chat.completion",
            "created": self._created,
            "model": self._model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "logprobs": None,
                    "finish_reason": cast(FinishReason, result.finish_reason),
                }
            ],
            "usage": usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens),
        }

    def chunk(self, text: str, finish_reason: str | None, *, first: bool) -> ChatCompletionChunk:
        delta: ChatDelta = {"role": "assistant", "content": text} if first else {"content": text}
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [
                {
                    "index": 0,
                    "delta": delta,
                    "logprobs": None,
                    "finish_reason": cast("FinishReason | None", finish_reason),
                }
            ],
        }

    def usage_chunk(self, totals: Usage) -> ChatCompletionChunk:
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [],
            "usage": totals,
        }


class ChatService:
    def __init__(
        self,
        router: PoolRouter,
        runner: GenerationRunner,
        images: ImageLoader,
        *,
        platform: Platform,
    ) -> None:
        self._router = router
        self._runner = runner
        self._images = images
        self._platform = platform

    async def prepare(
        self, body: ChatCompletionRequest, request_id: str, *, tenant: Tenant | None = None
    ) -> tuple[PoolConfig, GenerationRequest]:
        """`tenant`: checked for the model and its image limit before any image is fetched or
        decoded (the gate checks again, for callers that pass none)."""
        pool = self._router.resolve(body.model)
        image_count = _check_image_parts(body, pool)
        if tenant is not None:
            check_access(tenant, pool, model=body.model, images=image_count)
        if body.max_completion_tokens is not None:
            body = body.model_copy(update={"max_tokens": body.max_completion_tokens})
        sampling = sampling_options(body, pool, self._platform)
        messages, images = await self._messages(body)
        request = GenerationRequest(
            request_id=request_id,
            model=body.model,
            sampling=sampling,
            messages=messages,
            images=images,
        )
        return pool, request

    async def create(
        self, caller: Caller, body: ChatCompletionRequest, request_id: str, *, from_stream: bool = False
    ) -> tuple[ChatCompletion, dict[str, str]]:
        """`from_stream`: assembled from the pool's stream (`GenerationRunner.collect`)."""
        pool, request = await self.prepare(body, request_id, tenant=caller.tenant)
        shape = ChatShape(uuid.uuid4().hex, body.model)
        if from_stream:
            return await self._runner.collect(caller, pool, request, shape)
        return await self._runner.complete(caller, pool, request, shape)

    async def create_stream(
        self, caller: Caller, body: ChatCompletionRequest, request_id: str
    ) -> tuple[AsyncIterator[ChatCompletionChunk], dict[str, str]]:
        pool, request = await self.prepare(body, request_id, tenant=caller.tenant)
        return await self._runner.open_stream(
            caller, pool, request, ChatShape(uuid.uuid4().hex, body.model), include_usage=body.include_usage()
        )

    async def _messages(
        self, body: ChatCompletionRequest
    ) -> tuple[tuple[ChatMessage, ...], tuple[bytes, ...]]:
        messages: list[ChatMessage] = []
        images: list[bytes] = []
        for i, message in enumerate(body.messages):
            content = message.content
            if content is None or isinstance(content, str):
                messages.append(ChatMessage(role=message.role, text=content or ""))
                continue
            texts: list[str] = []
            count = 0
            for j, part in enumerate(content):
                if isinstance(part, TextPart):
                    texts.append(part.text)
                    continue
                assert isinstance(part, ImagePart)
                param = f"messages[{i}].content[{j}].image_url.url"
                images.append(await self._images.load(part.image_url.url, param=param))
                count += 1
            messages.append(ChatMessage(role=message.role, text="\n".join(texts), image_count=count))
        return tuple(messages), tuple(images)


def _check_image_parts(body: ChatCompletionRequest, pool: PoolConfig) -> int:
    """The pool's own image rules, naming the offending part; nothing fetched or decoded yet.
    Returns the number of images."""
    count = 0
    for i, message in enumerate(body.messages):
        if not isinstance(message.content, list):
            continue
        for j, part in enumerate(message.content):
            if not isinstance(part, ImagePart):
                continue
            param = f"messages[{i}].content[{j}].image_url"
            if pool.modality is not Modality.vision:
                raise UnsupportedContent(
                    f"model '{body.model}' accepts text only; send images to a vision model "
                    "such as phi-3.5-vision",
                    param=param,
                )
            if count >= pool.max_images_per_request:
                raise InvalidRequest(
                    f"too many images: model '{body.model}' takes at most "
                    f"{pool.max_images_per_request} image(s) per request",
                    param=param,
                )
            count += 1
    return count
