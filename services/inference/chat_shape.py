"""OpenAI's chat.completion objects, built from the engine's results and chunks."""

from __future__ import annotations

import time
from typing import cast

from services.inference.logprobs import chat_logprobs
from services.inference.protocol.responses import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    FinishReason,
    Usage,
    usage,
)
from services.inference.tool_calls import ToolCallOutput
from services.pools.engine import GenerationChunk, GenerationResult


class ChatShape:
    """`response_id` is the server's (a fresh uuid, or a batch line's `<batch>-<line>`),
    never the client's x-request-id: two tenants sending the same x-request-id must not
    get the same response id (issue 9, item 1).

    `tools`: the request forced a tool call, so each choice's text is the call's JSON and
    is answered as `tool_calls`. `echo_prefix`: with `echo`, the last (assistant) message's
    text, prepended to each choice."""

    def __init__(
        self, response_id: str, model: str, *, tools: ToolCallOutput | None = None, echo_prefix: str = ""
    ) -> None:
        self._id = f"chatcmpl-{response_id}"
        self._model = model
        self._created = int(time.time())
        self._tools = tools
        self._echo_prefix = echo_prefix
        self._started: set[int] = set()  # choices whose first chunk went out

    def response(self, result: GenerationResult) -> ChatCompletion:
        choices: list[ChatChoice] = []
        for choice in result.choices:
            finish = choice.finish_reason
            if self._tools is None:
                message: AssistantMessage = {"role": "assistant", "content": self._echo_prefix + choice.text}
            else:
                calls = self._tools.calls(choice.text, choice.index)
                # No call parsed (cut at max_tokens): the text as it came, finish "length".
                message = (
                    {"role": "assistant", "content": None, "tool_calls": calls}
                    if calls
                    else {"role": "assistant", "content": choice.text}
                )
                finish = self._tools.finish_reason(finish)
            choices.append(
                {
                    "index": choice.index,
                    "message": message,
                    "logprobs": chat_logprobs(choice.logprobs),
                    "finish_reason": cast(FinishReason, finish),
                }
            )
        return {
            "id": self._id,
            "object": "chat.completion",
            "created": self._created,
            "model": self._model,
            "choices": choices,
            "usage": usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens),
        }

    def chunk(self, piece: GenerationChunk, totals: Usage | None = None) -> ChatCompletionChunk:
        first = piece.index not in self._started
        self._started.add(piece.index)
        finish = piece.finish_reason
        delta: ChatDelta = {"role": "assistant"} if first else {}
        if self._tools is None:
            delta["content"] = self._echo_prefix + piece.text if first else piece.text
        else:
            calls = self._tools.deltas(piece.index, piece.text, finished=finish is not None)
            if calls:
                delta["tool_calls"] = calls
            if finish is not None:
                finish = self._tools.finish_reason(finish)
        body: ChatCompletionChunk = {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [
                {
                    "index": piece.index,
                    "delta": delta,
                    "logprobs": chat_logprobs(piece.logprobs),
                    "finish_reason": cast("FinishReason | None", finish),
                }
            ],
        }
        if totals is not None:
            body["usage"] = totals
        return body

    def usage_chunk(self, totals: Usage) -> ChatCompletionChunk:
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [],
            "usage": totals,
        }
