"""HTTP only: POST /v1/chat/completions."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from services.gateway.chat.protocol import ChatCompletionRequest
from services.gateway.deps import CurrentCaller, RequestId, Services
from services.gateway.errors import ERROR_RESPONSES
from services.gateway.sse import sse_response

router = APIRouter()


@router.post("/v1/chat/completions", responses=ERROR_RESPONSES, response_model=None)
async def create_chat_completion(
    body: ChatCompletionRequest, services: Services, caller: CurrentCaller, request_id: RequestId
) -> JSONResponse | StreamingResponse:
    if body.stream:
        events, headers = await services.chat.create_stream(caller, body, request_id)
        return sse_response(events, headers)
    payload, headers = await services.chat.create(caller, body, request_id)
    return JSONResponse(payload, headers=headers)
