"""HTTP only: POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from services.gateway.deps import CoreServices, CurrentCaller, RequestId
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
    body: ChatCompletionRequest, core: CoreServices, caller: CurrentCaller, request_id: RequestId
) -> JSONResponse | StreamingResponse:
    if body.stream:
        events, headers = await core.chat.create_stream(caller, body, request_id)
        return sse_response(events, headers)
    payload, headers = await core.chat.create(caller, body, request_id)
    return JSONResponse(payload, headers=headers)
