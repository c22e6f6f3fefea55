"""phiserve across two Ray nodes (issue 15): placement by node resources, the pool node
killed mid-traffic (REST, streams, a running batch) and brought back, and a gateway replica
killed on the head. Real `ray start` processes, Redis, vLLM on the tiny model.

In file order: the node-loss test leaves the cluster whole again for the next."""

from __future__ import annotations

import io
import json
import os
import signal
import threading
import time
from typing import Any

import grpc
import httpx
import pytest
from openai import OpenAI

from services.grpc.client import Client as GrpcClient
from services.grpc.client import PhiserveRpcError, user
from services.local.ray_cluster import HEAD_NODE
from tests.batch.test_batch_e2e import assert_exactly_once, batch_file, wait_final
from tests.conftest import wait_until
from tests.helpers import new_tenant
from tests.multinode.conftest import POOL_NODE, RECOVERY_TIMEOUT_S, TwoNodes

pytestmark = [pytest.mark.multinode, pytest.mark.cluster]

MODEL = "phi-3.5-mini"
# Long enough to be mid-generation when the node dies (the tiny model makes ~200 tokens/s here).
LONG = {"max_tokens": 1000, "ignore_eos": True}
BATCH_ITEMS = 40
BATCH_TOKENS = 100
ANSWER_BOUND_S = 60.0  # a request in flight on the dead node ends well within this: never a hang


def _chat(**extra: Any) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 8,
        **extra,
    }


@pytest.fixture(scope="module")
def key(two_nodes: TwoNodes) -> str:
    with two_nodes.admin as admin:
        return new_tenant(admin, prefix="mn")[1]


@pytest.fixture(scope="module")
def client(two_nodes: TwoNodes, key: str) -> httpx.Client:
    return httpx.Client(base_url=two_nodes.url, timeout=120, headers={"Authorization": f"Bearer {key}"})


def test_gateway_on_the_head_and_the_pool_on_its_own_node(
    two_nodes: TwoNodes, client: httpx.Client, key: str
) -> None:
    """Ray places each replica by the resource it asks for and the node that advertises it."""
    assert len(two_nodes.replica_pids(HEAD_NODE, "gateway")) == 2
    assert len(two_nodes.replica_pids(HEAD_NODE, "batch-worker")) == 1
    assert two_nodes.replica_pids(HEAD_NODE, "pool-text") == []
    assert len(two_nodes.replica_pids(POOL_NODE, "pool-text")) == 1
    assert (
        two_nodes.replica_pids(POOL_NODE, "gateway")
        == two_nodes.replica_pids(POOL_NODE, "batch-worker")
        == []
    )
    # The gateway on one node calls the pool on the other, over REST and gRPC.
    answer = client.post("/v1/chat/completions", json=_chat())
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] > 0
    channel = grpc.insecure_channel(f"127.0.0.1:{two_nodes.settings.grpc_port}")
    try:
        reply = GrpcClient(api_key=key, channel=channel, timeout_s=60).chat(
            MODEL, [user("hi")], max_tokens=4, ignore_eos=True
        )
        assert reply.usage.completion_tokens == 4
    finally:
        channel.close()


class Traffic:
    """Unary requests and streams started before the node dies, each recording its end."""

    def __init__(self, client: httpx.Client, grpc_client: GrpcClient, *, unary: int, streams: int) -> None:
        self._client, self._grpc = client, grpc_client
        self.unary: list[tuple[int, dict[str, Any], str | None, float]] = []
        self.streams: list[tuple[int, list[str], float]] = []
        self.grpc_stream_errors: list[PhiserveRpcError] = []
        self.errors: list[BaseException] = []
        # Every stream (REST and one gRPC) has its first chunks, and the test.
        self.streaming = threading.Barrier(streams + 2)
        self._threads = [threading.Thread(target=self._one_unary) for _ in range(unary)]
        self._threads += [threading.Thread(target=self._one_stream) for _ in range(streams)]
        self._threads.append(threading.Thread(target=self._one_grpc_stream))
        for thread in self._threads:
            thread.start()

    def _one_unary(self) -> None:
        started = time.monotonic()
        try:
            answer = self._client.post("/v1/chat/completions", json=_chat(**LONG))
            self.unary.append(
                (
                    answer.status_code,
                    answer.json(),
                    answer.headers.get("retry-after"),
                    time.monotonic() - started,
                )
            )
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)

    def _one_stream(self) -> None:
        started, events = time.monotonic(), []
        try:
            with self._client.stream(
                "POST", "/v1/chat/completions", json=_chat(stream=True, **LONG)
            ) as answer:
                for line in answer.iter_lines():
                    if line.startswith("data: "):
                        events.append(line.removeprefix("data: "))
                        if len(events) == 2:
                            self.streaming.wait(timeout=ANSWER_BOUND_S)
                self.streams.append((answer.status_code, events, time.monotonic() - started))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)

    def _one_grpc_stream(self) -> None:
        chunks = 0
        try:
            for _ in self._grpc.chat_stream(MODEL, [user("hello there")], **LONG):
                chunks += 1
                if chunks == 2:
                    self.streaming.wait(timeout=ANSWER_BOUND_S)
            self.errors.append(AssertionError(f"the gRPC stream ended whole after {chunks} chunks"))
        except PhiserveRpcError as exc:
            self.grpc_stream_errors.append(exc)
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.errors.append(exc)

    def join(self, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)


def _start_batch(openai: OpenAI) -> str:
    upload = openai.files.create(
        file=("in.jsonl", io.BytesIO(batch_file(BATCH_ITEMS, max_tokens=BATCH_TOKENS))), purpose="batch"
    )
    batch = openai.batches.create(
        input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    wait_until(
        lambda: openai.batches.retrieve(batch.id).request_counts.completed >= 3,
        timeout_s=120,
        interval_s=0.2,
        what="batch under way",
    )
    return batch.id


def test_pool_node_lost_mid_traffic_then_back(two_nodes: TwoNodes, client: httpx.Client, key: str) -> None:
    openai = OpenAI(base_url=f"{two_nodes.url}/v1", api_key=key, max_retries=0, timeout=60)
    batch_id = _start_batch(openai)
    channel = grpc.insecure_channel(f"127.0.0.1:{two_nodes.settings.grpc_port}")
    traffic = Traffic(client, GrpcClient(api_key=key, channel=channel, timeout_s=120), unary=3, streams=2)
    traffic.streaming.wait(timeout=ANSWER_BOUND_S)  # both streams are generating

    assert two_nodes.kill_pool_node() > 0
    assert traffic.join(ANSWER_BOUND_S), "a request in flight on the dead node hung"
    assert not traffic.errors, traffic.errors
    # Unary requests: 503 with Retry-After, never a 500 or a hang.
    assert len(traffic.unary) == 3
    for status, body, retry_after, took in traffic.unary:
        assert (status, body["error"]["code"]) == (503, "no_live_replica"), body
        assert retry_after is not None and int(retry_after) > 0
        assert took < ANSWER_BOUND_S
    # Streams: the HTTP status was already 200; they end with an error event, then [DONE].
    assert len(traffic.streams) == 2
    for status, events, _ in traffic.streams:
        assert status == 200 and events[-1] == "[DONE]", events[-3:]
        assert json.loads(events[0])["choices"], events[0]  # they were generating
        assert json.loads(events[-2])["error"]["code"] == "no_live_replica", events[-2]
    # The gRPC stream ends with UNAVAILABLE and phiserve's code and retry delay.
    [grpc_error] = traffic.grpc_stream_errors
    assert (grpc_error.code, grpc_error.error_code) == (grpc.StatusCode.UNAVAILABLE, "no_live_replica")
    assert grpc_error.retry_after_s and grpc_error.retry_after_s > 0
    channel.close()

    # While the node is down: new requests are refused quickly, /ready says so, the batch waits.
    down = client.post("/v1/chat/completions", json=_chat())
    assert down.status_code == 503 and down.headers.get("retry-after"), down.text
    assert down.json()["error"]["code"] == "no_live_replica"
    wait_until(lambda: not two_nodes.ready(), timeout_s=60, what="/ready 503 with the pool node gone")
    waiting = openai.batches.retrieve(batch_id)
    assert waiting.status == "in_progress" and waiting.request_counts.failed == 0

    # The node comes back; nothing else is done, and service resumes.
    two_nodes.start_pool_node()
    back = time.monotonic()
    wait_until(
        lambda: client.post("/v1/chat/completions", json=_chat()).status_code == 200,
        timeout_s=RECOVERY_TIMEOUT_S,
        interval_s=1.0,
        what="chat served again after the pool node returned",
    )
    print(f"pool node back to first answer: {time.monotonic() - back:.1f} s")
    assert len(two_nodes.replica_pids(POOL_NODE, "pool-text")) == 1
    # The batch's items that were on the dead node ran again; each line ends exactly once.
    done = wait_final(openai, batch_id, timeout_s=RECOVERY_TIMEOUT_S)
    assert done.status == "completed"
    ok, errors = assert_exactly_once(openai, done, BATCH_ITEMS)
    assert not errors, errors[:2]
    assert all(line["response"]["body"]["usage"]["completion_tokens"] == BATCH_TOKENS for line in ok)
    wait_until(two_nodes.ready, timeout_s=60, what="/ready 200 again")


def test_a_killed_gateway_replica_leaves_the_other_serving(two_nodes: TwoNodes, client: httpx.Client) -> None:
    """HAProxy stops sending to a dead gateway replica; a client's one retry covers the
    request whose keep-alive connection was on it (a dropped connection, or HAProxy's 503
    with Retry-After). Serve then replaces the replica."""
    gateways = two_nodes.replica_pids(HEAD_NODE, "gateway")
    assert len(gateways) == 2
    os.kill(gateways[0], signal.SIGKILL)
    first_tries_failed = 0
    for _ in range(20):
        for attempt in range(2):
            try:
                answer = client.post("/v1/chat/completions", json=_chat())
            except httpx.TransportError:
                answer = None
            if answer is not None and answer.status_code == 200:
                break
            if answer is not None:  # HAProxy's own answer, never a 500 (services/ray_env.py)
                assert answer.status_code == 503 and answer.headers.get("retry-after"), answer.text
                assert answer.json()["error"]["code"] == "gateway_unavailable"
            first_tries_failed += attempt == 0
        else:
            pytest.fail("a request failed twice after one gateway replica died")
    assert first_tries_failed <= 2, f"{first_tries_failed} first tries failed: HAProxy kept the dead replica"
    assert gateways[0] not in two_nodes.replica_pids(HEAD_NODE, "gateway")
    wait_until(
        lambda: len(two_nodes.replica_pids(HEAD_NODE, "gateway")) == 2,
        timeout_s=120,
        what="Serve replaced the dead gateway replica",
    )
