"""OpenAI's `user` field (issue 11, item 3): each generation's log line carries the end
user as a keyed hash, never the raw value, on every path (unary, streamed, chat and
completions), and the hash cannot be made without the server's secret."""

from __future__ import annotations

import logging
import uuid
from pathlib import Path

import httpx
import pytest

from services.tenancy.end_users import EndUserIds
from tests.conftest import CACHE_SALT_SECRET as CACHE_SALT_SECRET_CLUSTER
from tests.conftest import Cluster, wait_until
from tests.fakes.gateway import CACHE_SALT_SECRET, InProcessGateway, sse_payloads

USER = "alice.smith@example.com"


def _requests() -> list[tuple[str, dict[str, object]]]:
    chat = {"model": "phi-3.5-mini", "messages": [{"role": "user", "content": "hi there"}], "user": USER}
    completion = {"model": "phi-3.5-mini", "prompt": "hi there", "user": USER}
    return [
        ("/v1/chat/completions", chat),
        ("/v1/chat/completions", {**chat, "stream": True}),
        ("/v1/completions", completion),
        ("/v1/completions", {**completion, "stream": True}),
    ]


async def test_the_log_line_carries_the_users_keyed_hash_never_the_user(
    inprocess_gateway: InProcessGateway, caplog: pytest.LogCaptureFixture
) -> None:
    gw = inprocess_gateway
    expected = EndUserIds.from_secret(CACHE_SALT_SECRET).digest(USER)
    assert expected is not None and USER not in expected
    caplog.set_level(logging.INFO)
    for path, body in _requests():
        caplog.clear()
        answer = await gw.client.post(path, json=body, headers=gw.auth)
        assert answer.status_code == 200, answer.text
        if body.get("stream"):
            assert sse_payloads(answer.text)
        lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("generation ")]
        assert len(lines) == 1, caplog.text
        assert f"user={expected}" in lines[0] and f"tenant={gw.tenant.id}" in lines[0]
        # Nowhere in any record of the request: not the address, nor its local part.
        assert USER not in caplog.text and "alice.smith" not in caplog.text
    # The engine got the hash too (for its own logs), never the raw value.
    assert {r.end_user for r in gw.engine("phi-3.5-mini").requests} == {expected}


async def test_without_a_user_the_line_says_so(
    inprocess_gateway: InProcessGateway, caplog: pytest.LogCaptureFixture
) -> None:
    gw = inprocess_gateway
    caplog.set_level(logging.INFO)
    answer = await gw.client.post(
        "/v1/completions", json={"model": "phi-3.5-mini", "prompt": "hi"}, headers=gw.auth
    )
    assert answer.status_code == 200, answer.text
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("generation ")]
    assert "user=- " in line


def test_the_hash_is_keyed_and_stable() -> None:
    ids = EndUserIds.from_secret("server-secret-0123456789abcdef")
    assert ids.digest(USER) == ids.digest(USER)  # the same user is one id across requests
    assert ids.digest(USER) != ids.digest("bob@example.com")
    # Another key gives another id: a dictionary of hashed candidates is useless without it.
    assert EndUserIds.from_secret("another-secret-0123456789abcdef").digest(USER) != ids.digest(USER)
    assert ids.digest(None) is None and ids.digest("") is None
    with pytest.raises(ValueError):
        EndUserIds(b"short")


def test_the_clusters_logs_carry_the_hash_and_never_the_user(cluster: Cluster, http: httpx.Client) -> None:
    import ray

    user = f"carol-{uuid.uuid4().hex[:8]}@example.com"
    expected = EndUserIds.from_secret(CACHE_SALT_SECRET_CLUSTER).digest(user)
    assert expected is not None
    body = {"model": "phi-3.5-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    assert http.post("/v1/chat/completions", json={**body, "user": user}).status_code == 200
    streamed = {**body, "user": user, "stream": True}
    with http.stream("POST", "/v1/chat/completions", json=streamed) as resp:
        assert resp.status_code == 200 and list(resp.iter_lines())
    log_dir = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"

    def logged() -> int:
        texts = [p.read_text(errors="replace") for p in log_dir.rglob("*") if p.is_file()]
        assert not any(user in text or user.split("@")[0] in text for text in texts), "raw user logged"
        return sum(text.count(f"user={expected}") for text in texts)

    # Both requests' lines (the gateway replicas write their logs as they go).
    wait_until(lambda: logged() >= 2, timeout_s=30, what="the requests' log lines with the hash")
