"""HTTP only: POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from services.gateway.deps import CoreServices, CurrentCaller, RequestId
from services.gateway.errors import ERROR_RESPONSES
from services.gateway.sse import sse_response
from services.inference.protocol.chat import ChatCompletionRequest

router = APIRouter()


@router.post("/v1/chat/completions", responses=ERROR_RESPONSES, response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, core: CoreServices, caller: CurrentCaller, request_id: RequestId
) -> JSONResponse | StreamingResponse:
    if body.stream:
        events, headers = await core.chat.create_stream(caller, body, request_id)
        return sse_response(events, headers)
    payload, headers = await core.chat.create(caller, body, request_id)
    return JSONResponse(payload, headers=headers)
