"""Request ids from the attacker's side (issue 9, item 1): a client's x-request-id is echoed
and logged, never the engine's request id, so another tenant reusing it cannot abort a
generation, and response ids are the server's own."""

from __future__ import annotations

import json
import threading
import uuid

import httpx

from tests.conftest import Cluster
from tests.gateway.test_tenancy_e2e import _client, _new_tenant

CHAT = "/v1/chat/completions"
# Long enough that the victim is still generating when the attacker leaves (a 2-core
# machine streams ~400-1,000 tokens/s through Serve); within the 2048-token context.
VICTIM_TOKENS = 1800


def _stream_body(max_tokens: int) -> dict:  # type: ignore[type-arg]
    return {
        "model": "phi-3.5-mini",
        "messages": [{"role": "user", "content": "Write a very long story"}],
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


class _Victim(threading.Thread):
    """Reads a whole stream, keeping every event; `started` is set at the first one."""

    def __init__(self, client: httpx.Client, request_id: str) -> None:
        super().__init__(daemon=True)
        self._client = client
        self._request_id = request_id
        self.started = threading.Event()
        self.done = threading.Event()
        self.events: list[dict] = []  # type: ignore[type-arg]
        self.headers: dict[str, str] = {}
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self._client.stream(
                "POST", CHAT, json=_stream_body(VICTIM_TOKENS), headers={"x-request-id": self._request_id}
            ) as resp:
                assert resp.status_code == 200, resp.read()
                self.headers = dict(resp.headers)
                for line in resp.iter_lines():
                    if line.startswith("data: ") and line != "data: [DONE]":
                        self.events.append(json.loads(line[len("data: ") :]))
                        self.started.set()
        except BaseException as exc:  # noqa: BLE001 - any failure in this thread fails the test's assertion
            self.error = exc
        finally:
            self.started.set()
            self.done.set()


def test_another_tenant_reusing_a_request_id_cannot_abort_the_stream(
    cluster: Cluster, admin: httpx.Client
) -> None:
    _, victim_key, _ = _new_tenant(admin)
    _, attacker_key, _ = _new_tenant(admin)
    shared_id = f"shared-{uuid.uuid4().hex[:8]}"
    with _client(cluster, victim_key) as victim_client, _client(cluster, attacker_key) as attacker_client:
        victim = _Victim(victim_client, shared_id)
        victim.start()
        assert victim.started.wait(60) and victim.error is None, victim.error
        # The attacker streams with the victim's id and leaves after its first event.
        with attacker_client.stream(
            "POST", CHAT, json=_stream_body(50), headers={"x-request-id": shared_id}
        ) as resp:
            assert resp.status_code == 200
            assert resp.headers["x-request-id"] == shared_id  # echoed, as for anyone
            first = next(line for line in resp.iter_lines() if line.startswith("data: "))
            attacker_id = json.loads(first[len("data: ") :])["id"]
        victim_was_running = not victim.done.is_set()
        victim.join(120)
    assert victim_was_running, "the victim's stream ended before the attacker left; lengthen it"
    assert victim.error is None, victim.error
    assert victim.headers["x-request-id"] == shared_id
    finish = [c["finish_reason"] for e in victim.events for c in e["choices"] if c["finish_reason"]]
    assert finish == ["length"], finish
    assert victim.events[-1]["usage"]["completion_tokens"] == VICTIM_TOKENS
    # Response ids are the server's: never derived from the client's id, never shared.
    victim_id = victim.events[0]["id"]
    assert victim_id != attacker_id
    assert shared_id not in victim_id and shared_id not in attacker_id
    assert {e["id"] for e in victim.events} == {victim_id}


def test_unary_response_ids_are_unique_whatever_the_request_id(cluster: Cluster, http: httpx.Client) -> None:
    body = {"model": "phi-3.5-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    ids = set()
    for path, prefix, payload in (
        (CHAT, "chatcmpl-", body),
        ("/v1/completions", "cmpl-", {"model": "phi-3.5-mini", "prompt": "hi", "max_tokens": 2}),
    ):
        for _ in range(2):
            resp = http.post(path, json=payload, headers={"x-request-id": "same-id"})
            assert resp.status_code == 200, resp.text
            assert resp.headers["x-request-id"] == "same-id"
            assert resp.json()["id"].startswith(prefix) and "same-id" not in resp.json()["id"]
            ids.add(resp.json()["id"])
    assert len(ids) == 4
