"""POST /tokenize and /detokenize: the model's own tokenizer at the gateway, no pool hop.

Clients budget prompts with these, so a count must be the one the engine will report as
`usage.prompt_tokens`. A prompt is encoded as the engine encodes a text prompt; messages go
through the chat service's own preparation (tool history written into the conversation, a
tools note, the role mapping) and the pool's `PromptRenderer`, here with the model's chat
template rendered by jinja2 (services/inference/chat_template.py), then encoded the same way.
Images are refused: their tokens are made by the pool's image processor.

Both calls are tenant-scoped like a generation: an unknown model is 404 `model_not_found`,
one the tenant may not use 403 `model_not_allowed`. A tenant's adapter (`ft:` id) counts with
its base model's tokenizer: LoRA changes weights, never the vocabulary. The adapters count them against the
tenant's RPM (`Core.api_limiter`), as they do for files and batches.
"""

from __future__ import annotations

from pydantic import ValidationError

from services.errors import InvalidRequest, ServiceUnavailable, UnsupportedContent
from services.inference.adapter_models import ModelResolver
from services.inference.chat import ChatService
from services.inference.chat_template import ChatTemplates
from services.inference.errors import invalid_request_from
from services.inference.gate import check_access
from services.inference.protocol.chat import ChatCompletionRequest, ChatMessageIn, ImagePart
from services.inference.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from services.inference.tokens import TokenCounter
from services.pools.prompts import PromptRenderer
from services.tenancy.models import Tenant

# Stands in for a generation's request id: prepare() records it in a request never sent.
TOKENIZE_REQUEST_ID = "tokenize"


class TokenizeService:
    def __init__(
        self, models: ModelResolver, chat: ChatService, tokens: TokenCounter, templates: ChatTemplates
    ) -> None:
        self._models = models
        self._chat = chat
        self._tokens = tokens
        self._templates = templates

    async def tokenize(self, tenant: Tenant, body: TokenizeRequest) -> TokenizeResponse:
        """`body.prompt`'s or `body.messages`' token ids, as the engine would count them."""
        pool = (await self._models.resolve(body.model, tenant_id=tenant.id)).pool
        if body.messages is not None:
            if body.prompt is not None:
                raise InvalidRequest("send prompt or messages, not both", param="prompt")
            text = await self.render_chat(tenant, body, body.messages)
        else:
            if body.prompt is None:
                raise InvalidRequest("send prompt (a text) or messages (a chat)", param="prompt")
            for param in ("tools", "tool_choice"):
                if getattr(body, param) is not None:
                    raise InvalidRequest(f"{param} goes with messages, not prompt", param=param)
            check_access(tenant, pool, model=body.model, images=0)
            text = body.prompt
        ids = await self._tokens.encode(pool, text, add_special_tokens=body.add_special_tokens)
        if not ids:
            raise InvalidRequest("the input makes no tokens", param="prompt")
        return TokenizeResponse(
            count=len(ids),
            max_model_len=pool.context_len,
            tokens=ids,
            token_strs=self._tokens.token_strings(pool, ids) if body.return_token_strs else None,
        )

    async def detokenize(self, tenant: Tenant, body: DetokenizeRequest) -> DetokenizeResponse:
        """The text of `body.tokens`; an id outside the vocabulary is a 400 naming `tokens`."""
        pool = (await self._models.resolve(body.model, tenant_id=tenant.id)).pool
        check_access(tenant, pool, model=body.model, images=0)
        return DetokenizeResponse(prompt=self._tokens.decode(pool, body.tokens, param="tokens"))

    async def render_chat(self, tenant: Tenant, body: TokenizeRequest, messages: list[ChatMessageIn]) -> str:
        """The prompt text the pool would make of these messages (and tools)."""
        for i, message in enumerate(messages):
            for j, part in enumerate(message.content if isinstance(message.content, list) else ()):
                if isinstance(part, ImagePart):
                    raise UnsupportedContent(
                        "/tokenize counts text only: an image's tokens are made by the pool's "
                        "image processor (the chat's usage.prompt_tokens reports them)",
                        param=f"messages[{i}].content[{j}]",
                    )
        try:
            chat = ChatCompletionRequest(
                model=body.model, messages=messages, tools=body.tools, tool_choice=body.tool_choice
            )
        except ValidationError as exc:
            raise invalid_request_from(exc.errors()) from None
        # Checks the tenant's access before anything else, as a chat completion does.
        pool, request, _ = await self._chat.prepare(chat, TOKENIZE_REQUEST_ID, tenant=tenant)
        template = self._templates.get(pool)
        if template is None:
            raise ServiceUnavailable(
                f"model '{body.model}' has no chat template at the gateway; tokenize a prompt instead"
            )
        renderer = PromptRenderer(template, modality=pool.modality)
        return renderer.render(request, add_generation_prompt=body.add_generation_prompt)
