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

import csv
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

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

import lt_config
from lt_clients import LoadTestError, LocustInterceptor, PhiserveUser, RestMixin, http_failure, multipart
from lt_config import BATCH, FINAL_BATCH_STATES, USER_CLASS_KEYS, build_config

from services.grpc.client import Client, PhiserveRpcError, user

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


def _set_user_weights(spec: str) -> None:
    classes = {"RestUser": RestUser, "GrpcUser": GrpcUser, "VisionUser": VisionUser, "BatchUser": BatchUser}
    for item in filter(None, (part.strip() for part in spec.split(","))):
        name, _, weight = item.partition("=")
        cls = classes[USER_CLASS_KEYS.get(name.strip().lower(), name.strip())]
        cls.weight = int(weight)



@events.init.add_listener
def _init(environment: Environment, **_: Any) -> None:
    if environment.parsed_options is None:  # locust used as a library without options
        return
    lt_config.ENVIRONMENT = environment
    config = lt_config.CONFIG = build_config(environment)
    _set_user_weights(environment.parsed_options.user_weights)
    FastHttpUser.network_timeout = config.request_timeout
    FastHttpUser.connection_timeout = min(config.request_timeout, 30.0)


@events.quit.add_listener
def _final_csv(**_: Any) -> None:
    """Write the --csv files once more, from the final stats.

    Locust rewrites them every second while it runs but not at the end, so the last second
    (and the requests finished during --stop-timeout) would be missing from the files that
    loadtests/check_report.py judges. Locust's own writer flushes after each pass and is
    closed right after this event, so these files are the ones that stay.
    """
    env = lt_config.ENVIRONMENT
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


# -- REST --------------------------------------------------------------------------------


class RestUser(RestMixin, FastHttpUser):
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


class VisionUser(RestMixin, FastHttpUser):
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


class BatchUser(RestMixin, FastHttpUser):
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
                resp.failure(http_failure(resp))
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
        data, content_type = multipart(
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


class GrpcUser(PhiserveUser, User):
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
