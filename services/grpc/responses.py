"""The core's typed response bodies (services/inference/protocol/responses.py) as proto
messages: gRPC answers with what REST and batch output answer, converted, never shaped a
second time. Each message adds the client's request id (echoed) to the core's body."""

from __future__ import annotations

from services.grpc.gen.phiserve.v1 import chat_pb2, common_pb2, completion_pb2, models_pb2
from services.grpc.gen.phiserve.v1 import inference_service_pb2 as pb
from services.inference.protocol.responses import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    ChatLogprobs,
    Completion,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    Model,
    ModelList,
    Usage,
)
from services.inference.protocol.tokenize import TokenizeResponse

FINISH_REASONS: dict[str | None, common_pb2.FinishReason] = {
    None: common_pb2.FINISH_REASON_UNSPECIFIED,
    "stop": common_pb2.FINISH_REASON_STOP,
    "length": common_pb2.FINISH_REASON_LENGTH,
    "abort": common_pb2.FINISH_REASON_ABORT,
    "tool_calls": common_pb2.FINISH_REASON_TOOL_CALLS,
}
MODALITIES: dict[str, models_pb2.Modality] = {
    "text": models_pb2.MODALITY_TEXT,
    "vision": models_pb2.MODALITY_VISION,
}


def finish(reason: str | None) -> common_pb2.FinishReason:
    return FINISH_REASONS.get(reason, common_pb2.FINISH_REASON_UNSPECIFIED)


def usage(totals: Usage) -> common_pb2.Usage:
    return common_pb2.Usage(
        prompt_tokens=totals["prompt_tokens"],
        completion_tokens=totals["completion_tokens"],
        total_tokens=totals["total_tokens"],
        prompt_tokens_details=common_pb2.PromptTokensDetails(
            cached_tokens=totals["prompt_tokens_details"]["cached_tokens"]
        ),
    )


def _message(message: AssistantMessage) -> chat_pb2.ChatMessage:
    return chat_pb2.ChatMessage(
        role=chat_pb2.ROLE_ASSISTANT,
        text=message["content"] or "",  # None when the answer is tool calls
        tool_calls=[
            chat_pb2.ToolCall(
                id=call["id"], name=call["function"]["name"], arguments=call["function"]["arguments"]
            )
            for call in message.get("tool_calls", ())
        ],
    )


def _delta(delta: ChatDelta) -> chat_pb2.ChatDelta:
    return chat_pb2.ChatDelta(
        # Only the first chunk names the role, as REST's delta.
        role=chat_pb2.ROLE_ASSISTANT if "role" in delta else chat_pb2.ROLE_UNSPECIFIED,
        content=delta.get("content", ""),
        tool_calls=[
            chat_pb2.ToolCallDelta(
                index=call["index"],
                id=call.get("id", ""),
                name=call["function"].get("name", ""),
                arguments=call["function"]["arguments"],
            )
            for call in delta.get("tool_calls", ())
        ],
    )


def _bytes(values: list[int] | None) -> bytes:
    return bytes(values or ())


def chat_logprobs(logprobs: ChatLogprobs | None) -> chat_pb2.ChatLogprobs | None:
    if logprobs is None:
        return None
    return chat_pb2.ChatLogprobs(
        content=[
            chat_pb2.TokenLogprob(
                token=token["token"],
                logprob=token["logprob"],
                bytes=_bytes(token["bytes"]),
                top_logprobs=[
                    chat_pb2.TopLogprob(
                        token=top["token"], logprob=top["logprob"], bytes=_bytes(top["bytes"])
                    )
                    for top in token["top_logprobs"]
                ],
            )
            for token in logprobs["content"]
        ]
    )


def completion_logprobs(logprobs: CompletionLogprobs | None) -> completion_pb2.CompletionLogprobs | None:
    if logprobs is None:
        return None
    return completion_pb2.CompletionLogprobs(
        tokens=logprobs["tokens"],
        token_logprobs=logprobs["token_logprobs"],
        top_logprobs=[completion_pb2.TopLogprobs(logprobs=top) for top in logprobs["top_logprobs"]],
        text_offset=logprobs["text_offset"],
    )


def _completion_choice(choice: CompletionChoice) -> completion_pb2.CompletionChoice:
    return completion_pb2.CompletionChoice(
        index=choice["index"],
        text=choice["text"],
        finish_reason=finish(choice["finish_reason"]),
        logprobs=completion_logprobs(choice["logprobs"]),
    )


def chat_response(body: ChatCompletion, request_id: str) -> pb.ChatResponse:
    return pb.ChatResponse(
        id=body["id"],
        request_id=request_id,
        model=body["model"],
        created=body["created"],
        choices=[
            chat_pb2.ChatChoice(
                index=choice["index"],
                message=_message(choice["message"]),
                finish_reason=finish(choice["finish_reason"]),
                logprobs=chat_logprobs(choice["logprobs"]),
            )
            for choice in body["choices"]
        ],
        usage=usage(body["usage"]),
    )


def chat_chunk(chunk: ChatCompletionChunk, request_id: str) -> pb.ChatStreamResponse:
    return pb.ChatStreamResponse(
        id=chunk["id"],
        request_id=request_id,
        model=chunk["model"],
        created=chunk["created"],
        choices=[
            chat_pb2.ChatStreamChoice(
                index=choice["index"],
                delta=_delta(choice["delta"]),
                finish_reason=finish(choice["finish_reason"]),
                logprobs=chat_logprobs(choice["logprobs"]),
            )
            for choice in chunk["choices"]
        ],
        usage=usage(chunk["usage"]) if "usage" in chunk else None,
    )


def completion_response(body: Completion, request_id: str) -> pb.CompleteResponse:
    return pb.CompleteResponse(
        id=body["id"],
        request_id=request_id,
        model=body["model"],
        created=body["created"],
        choices=[_completion_choice(choice) for choice in body["choices"]],
        usage=usage(body["usage"]),
    )


def completion_chunk(chunk: CompletionChunk, request_id: str) -> pb.CompleteStreamResponse:
    return pb.CompleteStreamResponse(
        id=chunk["id"],
        request_id=request_id,
        model=chunk["model"],
        created=chunk["created"],
        choices=[_completion_choice(choice) for choice in chunk["choices"]],
        usage=usage(chunk["usage"]) if "usage" in chunk else None,
    )


def model_message(entry: Model) -> models_pb2.Model:
    return models_pb2.Model(
        id=entry["id"],
        root=entry["root"],
        pool=entry["pool"],
        modality=MODALITIES.get(entry["modality"], models_pb2.MODALITY_UNSPECIFIED),
        max_model_len=entry["max_model_len"],
        max_images_per_request=entry["max_images_per_request"],
        created=entry["created"],
        owned_by=entry["owned_by"],
        parent=entry["parent"] or "",
    )


def models_response(listing: ModelList) -> pb.ListModelsResponse:
    """GET /v1/models' listing as proto, so both list the same models."""
    return pb.ListModelsResponse(models=[model_message(entry) for entry in listing["data"]])


def tokenize_response(body: TokenizeResponse) -> pb.TokenizeResponse:
    return pb.TokenizeResponse(
        count=body.count,
        max_model_len=body.max_model_len,
        tokens=body.tokens,
        token_strs=body.token_strs or (),
    )
