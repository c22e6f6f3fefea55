"""Who is calling and under which request id: the edge rules REST and gRPC share.

Pure functions over a header mapping (Starlette's case-insensitive `Headers`, or gRPC
metadata as a dict with lower-case keys), so the HTTP middleware, the FastAPI
dependencies and the gRPC servicer cannot drift apart.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping

REQUEST_ID_HEADER = "x-request-id"
# A client's id is echoed in a header and written to logs: a short token of safe
# characters, so it cannot split a header or a log line. Anything else gets a fresh id.
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def presented_key(headers: Mapping[str, str]) -> str | None:
    """The API key of `Authorization: Bearer <key>` or, as Azure OpenAI clients send it,
    `api-key: <key>`. An Authorization header of another scheme presents no key (it does
    not fall back to `api-key`)."""
    auth = headers.get("authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
        return None
    return headers.get("api-key")


def request_id(headers: Mapping[str, str]) -> str:
    """The client's `x-request-id` when it is a safe token, else a fresh server id.

    The id only names the request in responses and logs; engine request ids are the pool's
    own (issue 9, item 1), so a reused or guessed id cannot touch another request."""
    candidate = headers.get(REQUEST_ID_HEADER)
    if candidate and REQUEST_ID_PATTERN.fullmatch(candidate):
        return candidate
    return uuid.uuid4().hex
