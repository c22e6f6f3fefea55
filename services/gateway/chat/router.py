"""HTTP only: POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from services.gateway.deps import Generation
from services.gateway.errors import ERROR_RESPONSES
from services.gateway.openapi import event_stream
from services.gateway.sse import sse_response
from services.inference.protocol.chat import ChatCompletionRequest
from services.inference.protocol.responses import ChatCompletion, ChatCompletionChunk

router = APIRouter()


# The body is built and typed by the core; the route returns it as a ready response, so
# `response_model` documents it without validating each answer a second time.
@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses={
        200: event_stream(ChatCompletionChunk, "A chat.completion, or with `stream: true` its chunks"),
        **ERROR_RESPONSES,
    },
)
async def create_chat_completion(
    body: ChatCompletionRequest, call: Generation
) -> JSONResponse | StreamingResponse:
    chat = call.core.chat
    if body.stream:
        events, headers = await chat.create_stream(call.caller, body, call.request_id)
        return sse_response(events, headers)
    payload, headers = await chat.create(call.caller, body, call.request_id)
    return JSONResponse(payload, headers=headers)
