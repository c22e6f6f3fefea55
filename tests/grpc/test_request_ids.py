"""Request ids over gRPC from the attacker's side (issue 9, item 1): the x-request-id
metadata is echoed, never the engine's request id."""

from __future__ import annotations

import threading
import uuid

import grpc
import httpx

from services.grpc.client import Client, user
from services.grpc.gen.phiserve.v1 import common_pb2
from tests.grpc.conftest import new_tenant

VICTIM_TOKENS = 1800  # still generating when the attacker leaves; within the context
LONG = {"temperature": 0, "ignore_eos": True}


def test_another_tenant_reusing_a_request_id_cannot_abort_the_stream(
    grpc_channel: grpc.Channel, admin: httpx.Client
) -> None:
    _, victim_key = new_tenant(admin)
    _, attacker_key = new_tenant(admin)
    victim = Client(api_key=victim_key, channel=grpc_channel, timeout_s=120)
    attacker = Client(api_key=attacker_key, channel=grpc_channel, timeout_s=120)
    shared_id = f"shared-{uuid.uuid4().hex[:8]}"
    chunks: list = []  # type: ignore[type-arg]
    failure: list[BaseException] = []
    started, done = threading.Event(), threading.Event()

    def read_victim() -> None:
        try:
            for chunk in victim.chat_stream(
                "phi-3.5-mini",
                [user("Write a very long story")],
                include_usage=True,
                request_id=shared_id,
                max_tokens=VICTIM_TOKENS,
                **LONG,
            ):
                chunks.append(chunk)
                started.set()
        except BaseException as exc:  # noqa: BLE001 - any failure in this thread fails the test's assertion
            failure.append(exc)
        finally:
            started.set()
            done.set()

    reader = threading.Thread(target=read_victim, daemon=True)
    reader.start()
    assert started.wait(60) and not failure, failure
    # The attacker streams with the victim's id and leaves after its first message.
    stream = attacker.chat_stream("phi-3.5-mini", [user("hi")], request_id=shared_id, max_tokens=50, **LONG)
    attacker_first = next(stream)
    stream.close()  # cancels the call
    victim_was_running = not done.is_set()
    reader.join(120)
    assert victim_was_running, "the victim's stream ended before the attacker left; lengthen it"
    assert not failure, failure
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [common_pb2.FINISH_REASON_LENGTH], finishes
    assert chunks[-1].usage.completion_tokens == VICTIM_TOKENS
    # The client's id is echoed; the response id is the server's own, never shared.
    assert chunks[0].request_id == attacker_first.request_id == shared_id
    assert chunks[0].id != attacker_first.id and shared_id not in chunks[0].id
