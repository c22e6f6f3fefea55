"""Chat completions: validate messages and images, route, shape OpenAI responses."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

from services.catalog.models import Modality, Platform, PoolConfig
from services.errors import InvalidRequest, UnsupportedContent
from services.inference.adapter_models import ModelResolver
from services.inference.chat_shape import ChatShape
from services.inference.gate import check_access
from services.inference.generation import Caller, GenerationRunner
from services.inference.images import ImageLoader
from services.inference.protocol.chat import ChatCompletionRequest, ChatMessageIn, ImagePart, TextPart
from services.inference.protocol.responses import ChatCompletion, ChatCompletionChunk
from services.inference.sampling import sampling_options
from services.inference.tool_calls import plan_tools
from services.pools.engine import ChatMessage, GenerationRequest
from services.tenancy.end_users import EndUserIds
from services.tenancy.models import Tenant


class ChatService:
    def __init__(
        self,
        models: ModelResolver,
        runner: GenerationRunner,
        images: ImageLoader,
        *,
        platform: Platform,
        end_users: EndUserIds | None = None,
    ) -> None:
        self._models = models
        self._runner = runner
        self._images = images
        self._platform = platform
        self._end_users = end_users or EndUserIds.from_secret(None)

    async def prepare(
        self,
        body: ChatCompletionRequest,
        request_id: str,
        *,
        tenant: Tenant | None = None,
        response_id: str | None = None,
    ) -> tuple[PoolConfig, GenerationRequest, ChatShape]:
        """`tenant`: checked for the model and its image limit before any image is fetched or
        decoded (the gate checks again, for callers that pass none); with none, only plain
        model names resolve (an adapter is always a tenant's). `response_id`: a batch line's,
        else a fresh one."""
        resolved = await self._models.resolve(body.model, tenant_id=tenant.id if tenant else None)
        pool = resolved.pool
        image_count = _check_image_parts(body, pool)
        if tenant is not None:
            check_access(tenant, pool, model=body.model, images=image_count)
        _check_tool_history(body)
        tools = plan_tools(body)
        sampling = sampling_options(body, pool, self._platform)
        if tools.structured is not None:
            sampling = replace(sampling, structured=tools.structured)
        messages, images = await self._messages(body)
        if tools.system_note is not None:
            messages = (ChatMessage(role="system", text=tools.system_note), *messages)
        request = GenerationRequest(
            request_id=request_id,
            model=body.model,
            sampling=sampling,
            messages=messages,
            images=images,
            end_user=self._end_users.digest(body.user),
            adapter=resolved.adapter,
        )
        echo = ""
        if body.echo and body.messages[-1].role == "assistant":
            echo = messages[-1].text
        shape = ChatShape(response_id or uuid.uuid4().hex, body.model, tools=tools.output, echo_prefix=echo)
        return pool, request, shape

    async def create(
        self, caller: Caller, body: ChatCompletionRequest, request_id: str, *, from_stream: bool = False
    ) -> tuple[ChatCompletion, dict[str, str]]:
        """`from_stream`: assembled from the pool's stream (`GenerationRunner.collect`)."""
        pool, request, shape = await self.prepare(body, request_id, tenant=caller.tenant)
        if from_stream:
            return await self._runner.collect(caller, pool, request, shape)
        return await self._runner.complete(caller, pool, request, shape)

    async def create_stream(
        self, caller: Caller, body: ChatCompletionRequest, request_id: str
    ) -> tuple[AsyncIterator[ChatCompletionChunk], dict[str, str]]:
        pool, request, shape = await self.prepare(body, request_id, tenant=caller.tenant)
        return await self._runner.open_stream(
            caller,
            pool,
            request,
            shape,
            include_usage=body.include_usage(),
            continuous_usage=body.continuous_usage(),
        )

    async def _messages(
        self, body: ChatCompletionRequest
    ) -> tuple[tuple[ChatMessage, ...], tuple[bytes, ...]]:
        messages: list[ChatMessage] = []
        images: list[bytes] = []
        for i, message in enumerate(body.messages):
            content = message.content
            if content is None or isinstance(content, str):
                messages.append(ChatMessage(role=message.role, text=_history_text(message, content or "")))
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
            text = _history_text(message, "\n".join(texts))
            messages.append(ChatMessage(role=message.role, text=text, image_count=count))
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


def _check_tool_history(body: ChatCompletionRequest) -> None:
    for i, message in enumerate(body.messages):
        if message.tool_calls is not None and message.role != "assistant":
            raise InvalidRequest(
                "only assistant messages carry tool_calls", param=f"messages[{i}].tool_calls"
            )
        if message.role == "tool" and not message.tool_call_id:
            raise InvalidRequest("a tool message needs the tool_call_id it answers", param=f"messages[{i}]")
        if message.tool_call_id is not None and message.role != "tool":
            raise InvalidRequest("only tool messages carry tool_call_id", param=f"messages[{i}].tool_call_id")


def _history_text(message: ChatMessageIn, text: str) -> str:
    """Earlier tool calls and their results, written into the conversation: Phi-3.5's chat
    template has no place for them (a tool message is rendered as the user's)."""
    if message.tool_calls:
        calls = [{"name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls]
        return (text + "\n" if text else "") + json.dumps(calls, separators=(",", ":"))
    if message.role == "tool":
        return f"Result of tool call {message.tool_call_id}:\n{text}"
    return text
