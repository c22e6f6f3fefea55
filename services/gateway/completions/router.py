"""HTTP only: POST /v1/completions."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from services.gateway.deps import CoreServices, CurrentCaller, RequestId
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
async def create_completion(
    body: CompletionRequest, core: CoreServices, caller: CurrentCaller, request_id: RequestId
) -> JSONResponse | StreamingResponse:
    if body.stream:
        events, headers = await core.completions.create_stream(caller, body, request_id)
        return sse_response(events, headers)
    payload, headers = await core.completions.create(caller, body, request_id)
    return JSONResponse(payload, headers=headers)
