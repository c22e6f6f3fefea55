"""Billing through the real cluster, from the tenant's side (issue 9, items 5 and 9).

A tenant pays for what the engine generated for it: not for a prompt refused before it
could run, not for a request the pool refused, and not twice.
"""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.conftest import Cluster

CHAT = "/v1/chat/completions"
BROKEN_IMAGE = "data:image/png;base64,aGVsbG8="  # "hello": the vision pool cannot decode it


def _tenant(cluster: Cluster, admin: httpx.Client, **limits: int) -> httpx.Client:
    tenant_id = f"bill-{uuid.uuid4().hex[:10]}"
    assert admin.post("/admin/tenants", json={"id": tenant_id, "limits": limits}).status_code == 201
    created = admin.post(f"/admin/tenants/{tenant_id}/keys", json={"name": "billing"})
    assert created.status_code == 201, created.text
    return httpx.Client(
        base_url=cluster.url, timeout=120, headers={"Authorization": f"Bearer {created.json()['key']}"}
    )


def _billed(client: httpx.Client) -> dict[str, int]:
    resp = client.get("/v1/usage")
    assert resp.status_code == 200, resp.text
    rows = resp.json()["data"]
    return {f: sum(r[f] for r in rows) for f in ("requests", "prompt_tokens", "completion_tokens")}


def _error(resp: httpx.Response, status: int) -> dict:  # type: ignore[type-arg]
    assert resp.status_code == status, resp.text
    return resp.json()["error"]  # type: ignore[no-any-return]


def test_prompt_beyond_context_is_refused_before_admission_and_not_billed(
    cluster: Cluster, admin: httpx.Client
) -> None:
    # The usage route counts against RPM as well (issue 9, item 4): 3 = two usage reads and
    # one generation. Had any refused prompt been admitted, a later call would be a 429.
    with _tenant(cluster, admin, rpm=3) as client:
        huge = [{"role": "user", "content": "word " * 40_000}]  # ~40,000 tokens, context 2,048
        err = _error(client.post(CHAT, json={"model": "phi-3.5-mini", "messages": huge}), 400)
        assert (err["code"], err["param"]) == ("context_length_exceeded", "messages")
        streamed = client.post(CHAT, json={"model": "phi-3.5-mini", "messages": huge, "stream": True})
        assert _error(streamed, 400)["code"] == "context_length_exceeded"
        # The prompt fits, but not with the completion asked for: reducing max_tokens fixes it.
        body = {
            "model": "phi-3.5-mini",
            "messages": [{"role": "user", "content": "word " * 1500}],
            "max_tokens": 1000,
        }
        err = _error(client.post(CHAT, json=body), 400)
        assert (err["code"], err["param"]) == ("context_length_exceeded", "max_tokens")
        assert "2048" in err["message"]
        err = _error(
            client.post("/v1/completions", json={"model": "phi-3.5-mini", "prompt": "word " * 40_000}), 400
        )
        assert (err["code"], err["param"]) == ("context_length_exceeded", "prompt")
        assert _billed(client) == {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}
        ok = client.post(
            CHAT,
            json={"model": "phi-3.5-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        )
        assert ok.status_code == 200, ok.text
        billed = _billed(client)
        assert billed["requests"] == 1
        assert billed["prompt_tokens"] == ok.json()["usage"]["prompt_tokens"]
        assert billed["completion_tokens"] == ok.json()["usage"]["completion_tokens"]


@pytest.mark.parametrize("stream", [False, True])
def test_request_refused_by_the_pool_bills_nothing(
    cluster: Cluster, admin: httpx.Client, stream: bool
) -> None:
    with _tenant(cluster, admin) as client:
        content = [
            {"type": "text", "text": "describe " * 50},
            {"type": "image_url", "image_url": {"url": BROKEN_IMAGE}},
        ]
        body = {
            "model": "phi-3.5-vision",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": 8,
            "stream": stream,
        }
        assert _error(client.post(CHAT, json=body), 400)["message"]
        assert _billed(client) == {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("date=0001-01-01&days=2", "date"),  # was a 500 (OverflowError before year 1)
        ("date=9999-12-31&days=1", None),
        ("date=2026-13-01", "date"),
        ("date=yesterday", "date"),
        ("days=0", "days"),
        ("days=93", "days"),
        ("days=abc", "days"),
        ("days=99999999999999999999999", "days"),
    ],
)
def test_usage_query_is_validated(http: httpx.Client, query: str, param: str | None) -> None:
    resp = http.get(f"/v1/usage?{query}")
    if param is None:
        assert resp.status_code == 200, resp.text
        return
    err = _error(resp, 400)
    assert err["param"] == param, err
