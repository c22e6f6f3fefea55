"""The OpenAPI document is exact (issue 10, item 8): schemathesis, every check, against the
in-process app (tests/fakes/: the real core, batch APIs and FastAPI app over fake engines,
real Redis, no Ray), authenticated with a real tenant key.

Every operation gets coverage cases (boundaries, unsupported methods) and a bounded number
of positive and negative examples, so the run takes about a minute. A failure names the
check: a server error, a schema-valid request rejected, a schema-invalid one accepted, a
status or content type the document does not list, a body that breaks its schema, a 405
without the right `Allow`.

Schemathesis drives the app through `requests`, whose adapter for the app's base URL hands
each prepared request to the fixture's `httpx` client, on the event loop that owns the app's
Redis clients (the loop is idle while a synchronous test runs).
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from requests.adapters import BaseAdapter
from requests.structures import CaseInsensitiveDict
from schemathesis.config import HealthCheck, SchemathesisConfig
from schemathesis.core.failures import FailureGroup
from schemathesis.core.transport import Response
from schemathesis.pytest.lazy import get_all_tests
from urllib3 import HTTPHeaderDict, HTTPResponse

from services.catalog.loader import load_catalog
from services.local.redis_server import LocalRedis
from tests.conftest import inprocess_redis_url
from tests.fakes.gateway import BASE_URL, InProcessGateway, run_inprocess_gateway
from tests.fakes.tokenizer import write_catalog_tokenizers

MAX_EXAMPLES = 12  # per operation and generation mode: ~1 minute for the whole document
# schemathesis's default for schema-valid requests (positive_data_acceptance).
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "429", "5xx"]


class InProcessAdapter(BaseAdapter):
    """A `requests` transport that answers from the in-process app."""

    def __init__(self, client: httpx.AsyncClient, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._client = client
        self._loop = loop

    def send(self, request: requests.PreparedRequest, **kwargs: Any) -> requests.Response:  # type: ignore[override]
        body = request.body.encode() if isinstance(request.body, str) else request.body
        answer = self._loop.run_until_complete(
            self._client.request(
                str(request.method), str(request.url), headers=dict(request.headers), content=body or b""
            )
        )
        response = requests.Response()
        response.status_code = answer.status_code
        response.reason = answer.reason_phrase
        response.headers = CaseInsensitiveDict(answer.headers)
        # schemathesis reads the headers (each value of a repeated one) from the raw response,
        # and an event stream's events from its body.
        response.raw = HTTPResponse(
            body=io.BytesIO(answer.content),
            preload_content=False,
            headers=HTTPHeaderDict(answer.headers.multi_items()),
            status=answer.status_code,
            version=11,
        )
        response._content = answer.content
        response._content_consumed = True  # type: ignore[attr-defined]
        response.encoding = answer.encoding
        response.elapsed = answer.elapsed
        response.url = str(request.url)
        response.request = request
        return response

    def close(self) -> None:
        pass


@pytest.fixture
async def served(
    redis_server: LocalRedis, tmp_path: Path
) -> AsyncIterator[tuple[InProcessGateway, asyncio.AbstractEventLoop]]:
    """The in-process gateway, with tokenizer files for its models: /tokenize answers (a
    model without them is a 503, which the server-error check would count)."""
    cache = tmp_path / "cache"
    write_catalog_tokenizers(load_catalog("local"), cache / "models")
    async with run_inprocess_gateway(inprocess_redis_url(redis_server), tmp_path, cache_dir=cache) as gateway:
        yield gateway, asyncio.get_running_loop()


@pytest.fixture
def session(
    served: tuple[InProcessGateway, asyncio.AbstractEventLoop], monkeypatch: pytest.MonkeyPatch
) -> requests.Session:
    """A session with the tenant's key. Every `requests` session of the test reaches the
    in-process app, not only this one: schemathesis's `ignored_auth` check sends its
    keyless probes through a session of its own."""
    gateway, loop = served
    adapter = InProcessAdapter(gateway.client, loop)
    network = requests.Session.get_adapter

    def get_adapter(self: requests.Session, url: str) -> BaseAdapter:
        return adapter if url.startswith(BASE_URL) else network(self, url)

    monkeypatch.setattr(requests.Session, "get_adapter", get_adapter)
    http = requests.Session()
    http.headers["Authorization"] = f"Bearer {gateway.api_key}"
    return http


# Where a schema-valid request is still refused for what JSON Schema cannot say (the server's
# state or a file's contents), the operation's positive examples may also get that 400, and
# nothing else: every other check still runs on them.
CONFIG = f"""
base-url = "{BASE_URL}"

[generation]
mode = "all"
max-examples = {MAX_EXAMPLES}
deterministic = true
database = "none"

# The file's bytes must be JSONL batch requests, checked line by line (services/batch/files.py).
[[operations]]
include-path = "/v1/files"
include-method = "POST"
checks.positive_data_acceptance.expected-statuses = {ACCEPTED + ["400"]}

# `after` is a cursor: it must name one of the tenant's batches.
[[operations]]
include-path = "/v1/batches"
include-method = "GET"
checks.positive_data_acceptance.expected-statuses = {ACCEPTED + ["400"]}

# ... or files.
[[operations]]
include-path = "/v1/files"
include-method = "GET"
checks.positive_data_acceptance.expected-statuses = {ACCEPTED + ["400"]}

# Exactly one of prompt and messages; tools go with messages; a chat's own rules (tool
# history, tool_choice) as for a chat completion.
[[operations]]
include-path-regex = "^(/v1)?/tokenize$"
checks.positive_data_acceptance.expected-statuses = {ACCEPTED + ["400"]}

# Token ids must be in the model's vocabulary.
[[operations]]
include-path-regex = "^(/v1)?/detokenize$"
checks.positive_data_acceptance.expected-statuses = {ACCEPTED + ["400"]}
"""


def _schema(gateway: InProcessGateway, loop: asyncio.AbstractEventLoop) -> Any:
    document = loop.run_until_complete(gateway.client.get("/openapi.json"))
    assert document.status_code == 200, document.text
    schema = schemathesis.openapi.from_dict(document.json(), config=SchemathesisConfig.from_str(CONFIG))
    schema.config.update(suppress_health_check=list(HealthCheck))
    schema.config.checks.update(included_check_names=["all"])
    return schema


def _call_and_validate(case: Any, session: requests.Session) -> None:
    case.call_and_validate(session=session)


def test_every_operation_conforms_to_the_document(
    served: tuple[InProcessGateway, asyncio.AbstractEventLoop], session: requests.Session
) -> None:
    gateway, loop = served
    failures: list[str] = []
    operations = 0
    # The tests `@schema.parametrize()` would run, one per operation (coverage phase, then
    # positive and negative examples); called here because its fixture-driven loader does not
    # run under pytest 9. Every operation runs, and every failure is reported at the end.
    for built in get_all_tests(
        schema=_schema(gateway, loop), test_func=_call_and_validate, settings=None, given_kwargs={}
    ):
        operation, run = built.ok()  # an operation the document cannot describe fails here
        operations += 1
        try:
            run(session=session)
        except FailureGroup as found:  # schemathesis's checks (a BaseExceptionGroup)
            failures.append(f"{operation.label}:\n{found}")
    assert operations >= 20, f"only {operations} operations in the document"
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize(
    ("path", "request_model"),
    [("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest")],
)
def test_stream_events_are_checked_against_their_chunk_schema(
    served: tuple[InProcessGateway, asyncio.AbstractEventLoop],
    session: requests.Session,
    path: str,
    request_model: str,
) -> None:
    """The fuzz run validates every event of a stream (the control: a chunk whose `object`
    is wrong fails), so the streams it passes are the documented chunks."""
    gateway, loop = served
    schema = _schema(gateway, loop)
    body = schema.raw_schema["components"]["schemas"][request_model]["examples"][-1]
    assert body["stream"] is True
    case = schema[path]["POST"].Case(body=body, media_type="application/json")
    answer = case.call(session=session)
    assert answer.status_code == 200 and answer.content.count(b"data: ") >= 3, answer.content
    case.validate_response(answer)  # the real stream conforms
    broken = answer.content.replace(b'"object":"', b'"object":"not-', 1)
    answer = Response(
        status_code=200,
        headers=answer.headers,
        content=broken,
        request=answer.request,
        elapsed=0.0,
        message="OK",
        encoding="utf-8",
        http_version="1.1",
        verify=True,
    )
    with pytest.raises(FailureGroup, match="SSE event violates schema"):
        case.validate_response(answer)
