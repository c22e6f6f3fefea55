"""HTTP only: POST /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from services.gateway.deps import Generation
from services.gateway.errors import ERROR_RESPONSES
from services.gateway.openapi import event_stream
from services.gateway.sse import sse_response
from services.inference.protocol.completions import CompletionRequest
from services.inference.protocol.responses import Completion, CompletionChunk

router = APIRouter()


# Documented, not validated per answer: see the chat route.
@router.post(
    "/v1/completions",
    response_model=Completion,
    responses={
        200: event_stream(CompletionChunk, "A text_completion, or with `stream: true` its chunks"),
        **ERROR_RESPONSES,
    },
)
async def create_completion(body: CompletionRequest, call: Generation) -> JSONResponse | StreamingResponse:
    completions = call.core.completions
    if body.stream:
        events, headers = await completions.create_stream(call.caller, body, call.request_id)
        return sse_response(events, headers)
    payload, headers = await completions.create(call.caller, body, call.request_id)
    return JSONResponse(payload, headers=headers)
