"""phiserve load test: what the user classes share, per protocol.

`PhiserveUser` (key, naming, pacing, reporting), `RestMixin` (chat over REST, SSE with time
to first token) and the Batch API's multipart upload, and for gRPC `LocustInterceptor`, which
reports every call (and a stream's first message, TTFT) to locust.
"""

from __future__ import annotations

import io
import json
import random
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import grpc
import lt_config
from locust.env import Environment
from lt_config import PROMPTS, RATE_LIMITED, REFUSAL_CODES, TTFT, ApiKey, Config

from services.grpc.client import PhiserveRpcError

# -- shared pieces -----------------------------------------------------------------------


class PhiserveUser:
    """Key, naming and pacing shared by every user class (a mixin)."""

    environment: Environment
    api_key: ApiKey

    @property
    def cfg(self) -> Config:
        assert lt_config.CONFIG is not None, "the phiserve locustfile needs locust's command-line options"
        return lt_config.CONFIG

    def wait_time(self) -> float:
        low, high = self.cfg.think_time
        return random.uniform(low, high)

    def _take_key(self) -> None:
        self.api_key = self.cfg.keys.pick()

    def name(self, base: str) -> str:
        return f"{base} @{self.api_key.label}" if self.cfg.stats_by_key else base

    def fire(
        self,
        request_type: str,
        name: str,
        response_time_ms: float,
        *,
        length: int = 0,
        exception: BaseException | None = None,
    ) -> None:
        self.environment.events.request.fire(
            request_type=request_type,
            name=name,
            response_time=response_time_ms,
            response_length=length,
            exception=exception,
            context={"key": self.api_key.label},
        )

    def next_is_stream(self) -> bool:
        """Streamed or unary, spread evenly by --stream-ratio (the first call streams)."""
        if self.cfg.stream_ratio <= 0:
            return False
        self._stream_credit = (
            getattr(self, "_stream_credit", 1.0 - self.cfg.stream_ratio) + self.cfg.stream_ratio
        )
        if self._stream_credit >= 1.0 - 1e-9:
            self._stream_credit -= 1.0
            return True
        return False

    def prompt(self) -> str:
        return f"{random.choice(PROMPTS)} (#{random.randrange(10**6)})"

    def sampling(self) -> dict[str, Any]:
        body: dict[str, Any] = {"max_tokens": self.cfg.max_tokens}
        if self.cfg.ignore_eos:
            body["ignore_eos"] = True
        return body


class LoadTestError(Exception):
    """A response that was received but is wrong (status, body, stream)."""


def _error_code(resp: Any) -> str:
    try:
        return str(json.loads(resp.content or b"{}")["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""


def http_failure(resp: Any) -> LoadTestError:
    """What went wrong with a non-200 response: the status and the API's error code, or the
    connection error when no response came (status 0)."""
    detail = _error_code(resp) if resp.status_code else repr(getattr(resp, "error", None))
    return LoadTestError(f"HTTP {resp.status_code} {detail}".strip())


def _sse_events(resp: Any) -> Iterator[bytes]:
    """The `data:` payloads of an SSE response, as they arrive."""
    buffer = b""
    for chunk in resp.iter_content(chunk_size=4096, decode_content=False):
        buffer += chunk if isinstance(chunk, bytes) else chunk.encode()
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            line = line.strip()
            if line.startswith(b"data:"):
                yield line[5:].strip()


class RestMixin(PhiserveUser):
    client: Any

    def _headers(self) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self.api_key.key}",
            "x-request-id": f"locust-{uuid.uuid4().hex[:16]}",
        }

    def _refused(self, resp: Any, base: str) -> bool:
        """A 429 is reported as its own, successful, type-429 entry."""
        if resp.status_code != 429:
            return False
        resp.request_meta["request_type"] = RATE_LIMITED
        resp.request_meta["name"] = self.name(f"{base} [{_error_code(resp) or 'rate_limited'}]")
        resp.success()
        return True

    def chat(self, base: str, messages: list[dict[str, Any]], model: str, *, stream: bool) -> None:
        name = self.name(base)
        body = {"model": model, "messages": messages, **self.sampling()}
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        started = time.perf_counter()
        with self.client.post(
            "/v1/chat/completions",
            json=body,
            headers=self._headers(),
            name=name,
            stream=stream,
            catch_response=True,
        ) as resp:
            if self._refused(resp, base):
                return
            if resp.status_code != 200:
                resp.failure(http_failure(resp))
                return
            if not stream:
                try:
                    answer = json.loads(resp.content)
                    ok = answer["object"] == "chat.completion" and answer["choices"] and "usage" in answer
                except (ValueError, KeyError, TypeError):
                    ok = False
                if not ok:
                    resp.failure(LoadTestError("malformed chat.completion body"))
                return
            self._read_stream(resp, base, started)

    def _read_stream(self, resp: Any, base: str, started: float) -> None:
        first: float | None = None
        done = usage = False
        error = ""
        length = 0
        try:
            for data in _sse_events(resp):
                length += len(data)
                if data == b"[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    error = str(event["error"].get("code") or event["error"].get("message"))
                    continue
                if event.get("choices") and first is None:
                    first = time.perf_counter()
                    self.fire(TTFT, self.name(f"TTFT {base}"), (first - started) * 1000)
                usage = usage or bool(event.get("usage"))
        except (ValueError, OSError) as exc:  # bad JSON, connection reset mid-stream
            error = f"{type(exc).__name__}: {exc}"
        # The entry measures the whole stream, not only the time to the response headers.
        resp.request_meta["response_time"] = (time.perf_counter() - started) * 1000
        resp.request_meta["response_length"] = length
        if error or not done or first is None or not usage:
            why = error or (
                "no [DONE]" if not done else "no content chunk" if first is None else "no usage chunk"
            )
            resp.failure(LoadTestError(f"stream: {why}"))


def multipart(fields: dict[str, str], filename: str, content: bytes) -> tuple[bytes, str]:
    boundary = f"locust-{uuid.uuid4().hex}"
    out = io.BytesIO()
    for key, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{key}"\r\n\r\n{value}\r\n'.encode())
    out.write(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/jsonl\r\n\r\n".encode()
    )
    out.write(content)
    out.write(f"\r\n--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


# -- gRPC --------------------------------------------------------------------------------


class _TimedStream:
    """A response-stream call that reports its first message (TTFT) and its end to locust."""

    def __init__(
        self, call: Any, on_first: Callable[[], None], on_end: Callable[[BaseException | None, int], None]
    ) -> None:
        self._call = call
        self._on_first = on_first
        self._on_end = on_end
        self._length = 0
        self._seen_first = False
        self._ended = False

    def __iter__(self) -> _TimedStream:
        return self

    def __next__(self) -> Any:
        try:
            message = next(self._call)
        except StopIteration:
            self._end(None)
            raise
        except grpc.RpcError as exc:
            self._end(exc)
            raise
        if not self._seen_first:
            self._seen_first = True
            self._on_first()
        self._length += message.ByteSize()
        return message

    def _end(self, error: BaseException | None) -> None:
        if not self._ended:
            self._ended = True
            self._on_end(error, self._length)

    def cancel(self) -> bool:
        # Called by the client when the caller leaves the loop; after a normal end it is a no-op.
        # A call cancelled before its end (the test stopping) is not reported.
        self._ended = True
        return bool(self._call.cancel())

    def __getattr__(self, name: str) -> Any:
        return getattr(self._call, name)


class LocustInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Reports every unary and response-streaming call as a locust request (type gRPC)."""

    def __init__(self, owner: PhiserveUser) -> None:
        self._owner = owner

    def _report(self, method: str, started: float, error: BaseException | None, length: int) -> None:
        short = method.rsplit("/", 1)[-1]
        elapsed = (time.perf_counter() - started) * 1000
        if isinstance(error, grpc.RpcError):
            rich = PhiserveRpcError.from_call(error)
            if rich.code == grpc.StatusCode.RESOURCE_EXHAUSTED and rich.error_code in REFUSAL_CODES:
                self._owner.fire(RATE_LIMITED, self._owner.name(f"gRPC {short} [{rich.error_code}]"), elapsed)
                return
            error = rich
        self._owner.fire("gRPC", self._owner.name(short), elapsed, length=length, exception=error)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        started = time.perf_counter()
        outcome = continuation(details, request)
        error = outcome.exception()  # waits (cooperatively) for the call to end
        self._report(details.method, started, error, 0 if error else outcome.result().ByteSize())
        return outcome

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        started = time.perf_counter()
        method = details.method.rsplit("/", 1)[-1]

        def first() -> None:
            self._owner.fire(
                TTFT, self._owner.name(f"TTFT gRPC {method}"), (time.perf_counter() - started) * 1000
            )

        return _TimedStream(
            continuation(details, request),
            first,
            lambda error, length: self._report(details.method, started, error, length),
        )
