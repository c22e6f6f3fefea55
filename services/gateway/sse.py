"""Server-Sent Events: the HTTP response that carries a stream through every hop unbuffered."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping

from fastapi.responses import StreamingResponse

from services.errors import PhiserveError
from services.gateway.errors import sse_error_event

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
DONE_EVENT = "data: [DONE]\n\n"
# One encoder for every event: `json.dumps` with any argument builds a new encoder per call
# (per streamed chunk); the output is the same bytes.
_COMPACT_JSON = json.JSONEncoder(separators=(",", ":"))


async def sse_events(payloads: AsyncIterator[Mapping[str, object]]) -> AsyncIterator[str]:
    try:
        async for payload in payloads:
            yield "data: " + _COMPACT_JSON.encode(payload) + "\n\n"
    except PhiserveError as exc:
        # The status line is gone: the error travels as an event, then [DONE].
        yield sse_error_event(exc)
    finally:
        await payloads.aclose()  # type: ignore[attr-defined]  # a GenerationStream: it closes
    yield DONE_EVENT


def sse_response(
    payloads: AsyncIterator[Mapping[str, object]], headers: dict[str, str] | None = None
) -> StreamingResponse:
    return StreamingResponse(
        sse_events(payloads), media_type="text/event-stream", headers={**SSE_HEADERS, **(headers or {})}
    )
