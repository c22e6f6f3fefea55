"""The prefix cache is per tenant (issue 9, item 6): a tenant cannot learn whether another
tenant sent a prompt by timing (or reading) prefix-cache hits, and cannot choose its salt."""

from __future__ import annotations

import json
import uuid

import httpx

from tests.conftest import Cluster
from tests.gateway.test_tenancy_e2e import _client, _new_tenant

# CPU block size is 128 tokens: only whole blocks are cached, so the prompt is long.
MIN_PROMPT_TOKENS = 512


def _long_prompt() -> str:
    # A fresh first line: no other test (or earlier run) can have cached this prefix.
    body = "\n".join(f"def helper_{i}(value):\n    return value * {i} + len(str(value))" for i in range(48))
    return f"# secret document {uuid.uuid4().hex}\n{body}\n"


def _cached(usage: dict) -> int:  # type: ignore[type-arg]
    return int(usage["prompt_tokens_details"]["cached_tokens"])


def test_a_tenant_cannot_hit_another_tenants_prefix_cache(cluster: Cluster, admin: httpx.Client) -> None:
    _, a_key, _ = _new_tenant(admin)
    _, b_key, _ = _new_tenant(admin)
    body = {"model": "phi-3.5-mini", "prompt": _long_prompt(), "max_tokens": 1, "temperature": 0}
    with _client(cluster, a_key) as a, _client(cluster, b_key) as b:
        first = a.post("/v1/completions", json=body)
        assert first.status_code == 200, first.text
        assert first.json()["usage"]["prompt_tokens"] >= MIN_PROMPT_TOKENS
        assert _cached(first.json()["usage"]) == 0
        # The same tenant again: served from its own cache (and the report shows it).
        again = a.post("/v1/completions", json=body)
        assert _cached(again.json()["usage"]) >= MIN_PROMPT_TOKENS - 128
        # Another tenant, the identical prompt: no hit, nothing to time.
        other = b.post("/v1/completions", json=body)
        assert other.status_code == 200, other.text
        assert _cached(other.json()["usage"]) == 0
        # B's own repeat hits B's cache; the streamed usage chunk reports it too.
        streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
        with b.stream("POST", "/v1/completions", json=streamed) as resp:
            events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
        assert _cached(events[-1]["usage"]) >= MIN_PROMPT_TOKENS - 128


def test_a_client_cannot_send_a_cache_salt(http: httpx.Client) -> None:
    for path, body in (
        ("/v1/completions", {"model": "phi-3.5-mini", "prompt": "hi", "max_tokens": 1}),
        ("/v1/chat/completions", {"model": "phi-3.5-mini", "messages": [{"role": "user", "content": "hi"}]}),
    ):
        resp = http.post(path, json={**body, "cache_salt": "tenant-a-guess"})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == "cache_salt"
