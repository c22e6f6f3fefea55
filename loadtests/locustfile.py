"""Load test for phiserve: REST, gRPC, vision and batch users over a mix of tenants' keys.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:8000 --keys-file keys.txt
    bash loadtests/run.sh --host http://127.0.0.1:8000 -u 20 -r 5 -t 2m --keys-file keys.txt \
        --max-error-rate 0.01 --max-p99-ms 5000          # headless, reports, pass/fail verdict

User classes (pick some by name on the command line, or set the mix with --user-weights):

    RestUser    POST /v1/chat/completions, unary ("chat") and SSE ("chat stream"), alternating
                by --stream-ratio; the time to the first token of a stream is its own entry,
                type TTFT ("TTFT chat stream"); a stream's own entry lasts to `data: [DONE]`
    GrpcUser    phiserve.v1.InferenceService Chat and ChatStream through services.grpc.client
                on a channel with a client interceptor that reports every call to locust
                (type gRPC; "TTFT gRPC ChatStream" for the first streamed message)
    VisionUser  chat with a generated PNG sent as a base64 data URL ("vision chat",
                "vision chat stream", "TTFT vision chat stream")
    BatchUser   upload a small JSONL file, create a batch, poll it to the end; each step is an
                entry ("batch upload", "batch create", "batch poll") and the job's turnaround,
                create to completed, is type BATCH ("batch job")

Keys (--keys-file): one key per line (blank lines and # comments ignored), or JSON: a list of
keys or of {"key", "name", "weight"} objects, {"keys": [...]}, or {"<key>": weight}. Each user
takes one key when it starts: round-robin, or weighted at random (--key-selection; `auto`
is weighted when the file gives weights). Without a file: $PHISERVE_API_KEY.

Refusals for load (HTTP 429, gRPC RESOURCE_EXHAUSTED with `rate_limit_exceeded` or
`overloaded`) are an expected outcome under load: they are reported as successes of type
"429", named after the request and the refusal ("chat [rate_limit_exceeded]"), so they are
visible in every report but are not failures. loadtests/run.sh counts them as errors only with
--count-429-as-errors.
"""

from __future__ import annotations

import base64
import csv
import io
import itertools
import json
import os
import random
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import gevent
import grpc
import grpc.experimental.gevent as grpc_gevent

# grpc's sync API must run its I/O on gevent's loop, or one blocked call stalls every user.
# This has to happen before the first channel is created.
grpc_gevent.init_gevent()

from locust import FastHttpUser, User, events, task
from locust.env import Environment

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from services.grpc.client import Client, PhiserveRpcError, user

TTFT = "TTFT"
RATE_LIMITED = "429"
BATCH = "BATCH"
REFUSAL_CODES = frozenset({"rate_limit_exceeded", "overloaded"})
FINAL_BATCH_STATES = frozenset({"completed", "failed", "cancelled", "expired"})
PROMPTS = (
    "Summarise the plot of a detective novel in two sentences.",
    "Explain what a load balancer does.",
    "Write a haiku about autumn rain.",
    "List three uses of a hash map.",
    "What is the capital of Australia, and why was it chosen?",
)
USER_CLASS_KEYS = {"rest": "RestUser", "grpc": "GrpcUser", "vision": "VisionUser", "batch": "BatchUser"}


# -- command line ------------------------------------------------------------------------


@events.init_command_line_parser.add_listener
def _arguments(parser: Any) -> None:
    group = parser.add_argument_group("phiserve")
    group.add_argument(
        "--keys-file",
        default="",
        env_var="PHISERVE_LOADTEST_KEYS_FILE",
        help="API keys: one per line, or JSON with weights (see the module doc). Default: $PHISERVE_API_KEY",
    )
    group.add_argument(
        "--key-selection",
        choices=("auto", "round-robin", "weighted"),
        default="auto",
        help="How each user picks its key (auto: weighted if the file has weights)",
    )
    group.add_argument(
        "--stats-by-key",
        action="store_true",
        default=False,
        help="Append ' @<key label>' to every entry name: one row per tenant key",
    )
    group.add_argument(
        "--chat-model",
        default="phi-3.5-mini",
        help="Model(s) for REST chat, comma-separated (one picked per request)",
    )
    group.add_argument("--grpc-model", default="", help="Model(s) for gRPC (default: --chat-model)")
    group.add_argument("--vision-model", default="phi-3.5-vision", help="Model(s) for vision chat")
    group.add_argument("--batch-model", default="", help="Model(s) for batch lines (default: --chat-model)")
    group.add_argument(
        "--stream-ratio",
        type=float,
        default=0.5,
        help="Share of chat calls (REST, vision, gRPC) that stream, 0..1; they alternate evenly",
    )
    group.add_argument("--max-tokens", type=int, default=16, help="max_tokens of every request")
    group.add_argument(
        "--ignore-eos",
        choices=("true", "false"),
        default="true",
        help="Send ignore_eos so every answer is exactly --max-tokens long",
    )
    group.add_argument("--image-size", default="224x224", help="Size of the generated PNG, WxH")
    group.add_argument(
        "--grpc-target",
        default="",
        help="host:port of the gRPC API (default: --host's host, port --grpc-port)",
    )
    group.add_argument("--grpc-port", type=int, default=9000, help="gRPC port when --grpc-target is not set")
    group.add_argument("--batch-lines", type=int, default=2, help="Lines in each uploaded batch file")
    group.add_argument("--batch-poll-interval", type=float, default=1.0, help="Seconds between batch polls")
    group.add_argument(
        "--batch-timeout",
        type=float,
        default=600.0,
        help="Seconds before a batch that is not final counts as a failed job",
    )
    group.add_argument("--request-timeout", type=float, default=120.0, help="Per-request timeout, seconds")
    group.add_argument(
        "--think-time",
        default="0.5,1.5",
        help="Seconds each user waits between tasks: 'MIN,MAX' (uniform) or one number",
    )
    group.add_argument(
        "--user-weights",
        default="rest=4,grpc=2,vision=1,batch=1",
        help="Share of users per class: rest=,grpc=,vision=,batch=",
    )


@dataclass(frozen=True)
class ApiKey:
    key: str
    label: str
    weight: float = 1.0


def _label(key: str, index: int) -> str:
    # phiserve keys are psk-<key id>-<secret>; the first two parts are the non-secret prefix.
    parts = key.split("-")
    return "-".join(parts[:2]) if key.startswith("psk-") and len(parts) > 2 else f"key{index + 1}"


def load_keys(path: str) -> list[ApiKey]:
    """Keys from a file: one per line, or JSON (list, {"keys": [...]}, or {key: weight})."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith(("[", "{")):
        data: Any = json.loads(text)
        if isinstance(data, dict) and "keys" in data:
            data = data["keys"]
        items = [{"key": k, "weight": w} for k, w in data.items()] if isinstance(data, dict) else list(data)
        keys = []
        for i, item in enumerate(items):
            item = {"key": item} if isinstance(item, str) else item
            label = str(item.get("name") or item.get("tenant") or _label(item["key"], i))
            keys.append(ApiKey(str(item["key"]), label, float(item.get("weight", 1.0))))
    else:
        lines = [line.strip() for line in text.splitlines()]
        keys = [
            ApiKey(k, _label(k, i)) for i, k in enumerate(k for k in lines if k and not k.startswith("#"))
        ]
    if not keys:
        raise ValueError(f"no API keys in {path}")
    if any(k.weight < 0 for k in keys) or not any(k.weight > 0 for k in keys):
        raise ValueError(f"key weights in {path} must be >= 0 and not all 0")
    return keys


class KeyPicker:
    def __init__(self, keys: list[ApiKey], mode: str) -> None:
        self.keys = keys
        self.weighted = mode == "weighted" or (mode == "auto" and len({k.weight for k in keys}) > 1)
        self._next = itertools.count()

    def pick(self) -> ApiKey:
        if self.weighted:
            return random.choices(self.keys, weights=[k.weight for k in self.keys])[0]
        return self.keys[next(self._next) % len(self.keys)]


@dataclass(frozen=True)
class Config:
    keys: KeyPicker
    stats_by_key: bool
    chat_models: list[str]
    grpc_models: list[str]
    vision_models: list[str]
    batch_models: list[str]
    stream_ratio: float
    max_tokens: int
    ignore_eos: bool
    image_url: str
    grpc_target: str
    batch_lines: int
    batch_poll_interval: float
    batch_timeout: float
    request_timeout: float
    think_time: tuple[float, float]


def _models(value: str, default: str) -> list[str]:
    return [m.strip() for m in (value or default).split(",") if m.strip()]


def png(width: int, height: int) -> bytes:
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (width, height), (30, 90, 200))
    draw = ImageDraw.Draw(picture)
    draw.rectangle((width // 4, height // 4, width // 2, height // 2), fill=(250, 200, 0))
    draw.ellipse((width // 2, height // 2, width - 4, height - 4), fill=(20, 160, 60))
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def build_config(environment: Environment) -> Config:
    options = environment.parsed_options
    if options.keys_file:
        keys = load_keys(options.keys_file)
    elif os.environ.get("PHISERVE_API_KEY"):
        keys = [ApiKey(os.environ["PHISERVE_API_KEY"], "PHISERVE_API_KEY")]
    else:
        raise SystemExit("phiserve locustfile: give --keys-file or set PHISERVE_API_KEY")
    grpc_target = options.grpc_target
    if not grpc_target:
        host = urlsplit(environment.host or "http://127.0.0.1:8000").hostname or "127.0.0.1"
        grpc_target = f"{host}:{options.grpc_port}"
    width, _, height = options.image_size.lower().partition("x")
    picture = png(int(width), int(height or width))
    think = [float(x) for x in str(options.think_time).split(",")]
    chat_models = _models(options.chat_model, "phi-3.5-mini")
    return Config(
        keys=KeyPicker(keys, options.key_selection),
        stats_by_key=options.stats_by_key,
        chat_models=chat_models,
        grpc_models=_models(options.grpc_model, ",".join(chat_models)),
        vision_models=_models(options.vision_model, "phi-3.5-vision"),
        batch_models=_models(options.batch_model, ",".join(chat_models)),
        stream_ratio=min(max(options.stream_ratio, 0.0), 1.0),
        max_tokens=options.max_tokens,
        ignore_eos=options.ignore_eos == "true",
        image_url="data:image/png;base64," + base64.b64encode(picture).decode(),
        grpc_target=grpc_target,
        batch_lines=options.batch_lines,
        batch_poll_interval=options.batch_poll_interval,
        batch_timeout=options.batch_timeout,
        request_timeout=options.request_timeout,
        think_time=(think[0], think[-1]),
    )


def _set_user_weights(spec: str) -> None:
    classes = {"RestUser": RestUser, "GrpcUser": GrpcUser, "VisionUser": VisionUser, "BatchUser": BatchUser}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, weight = item.partition("=")
        cls = classes[USER_CLASS_KEYS.get(name.strip().lower(), name.strip())]
        cls.weight = int(weight)


CONFIG: Config | None = None
ENVIRONMENT: Environment | None = None


@events.init.add_listener
def _init(environment: Environment, **_: Any) -> None:
    global CONFIG, ENVIRONMENT
    if environment.parsed_options is None:  # locust used as a library without options
        return
    ENVIRONMENT = environment
    CONFIG = build_config(environment)
    _set_user_weights(environment.parsed_options.user_weights)
    FastHttpUser.network_timeout = CONFIG.request_timeout
    FastHttpUser.connection_timeout = min(CONFIG.request_timeout, 30.0)


@events.quit.add_listener
def _final_csv(**_: Any) -> None:
    """Write the --csv files once more, from the final stats.

    Locust rewrites them every second while it runs but not at the end, so the last second
    (and the requests finished during --stop-timeout) would be missing from the files that
    loadtests/check_report.py judges. Locust's own writer flushes after each pass and is
    closed right after this event, so these files are the ones that stay.
    """
    env = ENVIRONMENT
    prefix = getattr(env.parsed_options, "csv_prefix", None) if env is not None else None
    if env is None or not prefix or env.runner is None:
        return
    from locust import stats

    writer = stats.StatsCSV(env, stats.PERCENTILES_TO_REPORT)
    for suffix, write in (
        ("_stats.csv", writer.requests_csv),
        ("_failures.csv", writer.failures_csv),
        ("_exceptions.csv", writer.exceptions_csv),
    ):
        with open(f"{prefix}{suffix}", "w", newline="", encoding="utf-8") as handle:
            write(csv.writer(handle))


# -- shared pieces -----------------------------------------------------------------------


class _PhiserveUser:
    """Key, naming and pacing shared by every user class (a mixin)."""

    environment: Environment
    api_key: ApiKey

    @property
    def cfg(self) -> Config:
        assert CONFIG is not None, "the phiserve locustfile needs locust's command-line options"
        return CONFIG

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


def _http_failure(resp: Any) -> LoadTestError:
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


class _RestMixin(_PhiserveUser):
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
                resp.failure(_http_failure(resp))
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


# -- REST --------------------------------------------------------------------------------


class RestUser(_RestMixin, FastHttpUser):
    """OpenAI-compatible chat over REST: unary and streamed (with time to first token)."""

    weight = 4

    def on_start(self) -> None:
        self._take_key()

    @task
    def chat_completion(self) -> None:
        stream = self.next_is_stream()
        messages = [{"role": "user", "content": self.prompt()}]
        self.chat(
            "chat stream" if stream else "chat", messages, random.choice(self.cfg.chat_models), stream=stream
        )


class VisionUser(_RestMixin, FastHttpUser):
    """Chat with an image: a generated PNG as a base64 data URL."""

    weight = 1

    def on_start(self) -> None:
        self._take_key()

    @task
    def vision_chat(self) -> None:
        stream = self.next_is_stream()
        parts = [
            {"type": "text", "text": "Describe the picture."},
            {"type": "image_url", "image_url": {"url": self.cfg.image_url}},
        ]
        messages = [{"role": "user", "content": parts}]
        name = "vision chat stream" if stream else "vision chat"
        self.chat(name, messages, random.choice(self.cfg.vision_models), stream=stream)


# -- batch -------------------------------------------------------------------------------


def _multipart(fields: dict[str, str], filename: str, content: bytes) -> tuple[bytes, str]:
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


class BatchUser(_RestMixin, FastHttpUser):
    """The Batch API: upload a JSONL file, create a batch, poll it until it is final."""

    weight = 1

    def on_start(self) -> None:
        self._take_key()

    def _json_step(self, method: str, path: str, base: str, **kwargs: Any) -> dict[str, Any] | None:
        """One recorded step; the parsed body, or None when it failed (or was refused)."""
        name = self.name(base)
        headers = {**self._headers(), **kwargs.pop("headers", {})}
        with self.client.request(
            method, path, name=name, headers=headers, catch_response=True, **kwargs
        ) as resp:
            if self._refused(resp, base):
                return None
            if resp.status_code != 200:
                resp.failure(_http_failure(resp))
                return None
            try:
                body: dict[str, Any] = json.loads(resp.content)
            except ValueError:
                resp.failure(LoadTestError("malformed JSON body"))
                return None
            return body

    @task
    def batch_job(self) -> None:
        lines = []
        for i in range(self.cfg.batch_lines):
            body = {
                "model": random.choice(self.cfg.batch_models),
                "messages": [{"role": "user", "content": self.prompt()}],
                **self.sampling(),
            }
            lines.append(
                json.dumps(
                    {"custom_id": f"q{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
                )
            )
        data, content_type = _multipart(
            {"purpose": "batch"}, "locust.jsonl", ("\n".join(lines) + "\n").encode()
        )
        upload = self._json_step(
            "POST", "/v1/files", "batch upload", data=data, headers={"Content-Type": content_type}
        )
        if upload is None:
            return
        batch = self._json_step(
            "POST",
            "/v1/batches",
            "batch create",
            json={
                "input_file_id": upload["id"],
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
                "metadata": {"source": "locust"},
            },
        )
        if batch is None:
            return
        started = time.perf_counter()
        while batch.get("status") not in FINAL_BATCH_STATES:
            if time.perf_counter() - started > self.cfg.batch_timeout:
                self.fire(
                    BATCH,
                    self.name("batch job"),
                    (time.perf_counter() - started) * 1000,
                    exception=LoadTestError(f"not final after {self.cfg.batch_timeout:g} s"),
                )
                return
            gevent.sleep(self.cfg.batch_poll_interval)
            polled = self._json_step("GET", f"/v1/batches/{batch['id']}", "batch poll")
            batch = polled if polled is not None else batch
        counts = batch.get("request_counts") or {}
        problem = None
        if batch["status"] != "completed":
            problem = LoadTestError(f"batch {batch['status']}")
        elif counts.get("failed"):
            problem = LoadTestError(f"{counts['failed']} of {counts.get('total')} lines failed")
        self.fire(BATCH, self.name("batch job"), (time.perf_counter() - started) * 1000, exception=problem)


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

    def __init__(self, owner: _PhiserveUser) -> None:
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


class GrpcUser(_PhiserveUser, User):
    """phiserve.v1.InferenceService over gRPC, through the typed client on an intercepted channel."""

    weight = 2

    def on_start(self) -> None:
        self._take_key()
        # One channel (one HTTP/2 connection) per user, so users spread over gateway replicas.
        self._channel = grpc.insecure_channel(self.cfg.grpc_target)
        channel = grpc.intercept_channel(self._channel, LocustInterceptor(self))
        self._client = Client(api_key=self.api_key.key, channel=channel, timeout_s=self.cfg.request_timeout)

    def on_stop(self) -> None:
        self._channel.close()

    @task
    def chat(self) -> None:
        model, messages = random.choice(self.cfg.grpc_models), [user(self.prompt())]
        try:
            if self.next_is_stream():
                for _ in self._client.chat_stream(model, messages, include_usage=True, **self.sampling()):
                    pass
            else:
                self._client.chat(model, messages, **self.sampling())
        except PhiserveRpcError:
            pass  # already reported by the interceptor


__all__ = ["BatchUser", "GrpcUser", "RestUser", "VisionUser"]
