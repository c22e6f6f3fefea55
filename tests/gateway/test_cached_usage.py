"""Cached prompt tokens on the real cluster (issue 13, item 3): the same long prompt twice
for one tenant. The second answer reports prefix-cache hits (vLLM's own count), the
tenant's usage report shows them, and the daily budget charged the second request less
than the first by the text pool's cached_prompt_billing_factor."""

from __future__ import annotations

import math
import time
import uuid

import httpx
import redis

from services.redis_store import keys
from services.tenancy.admission import utc_day
from tests.conftest import Cluster
from tests.gateway.test_tenancy_e2e import _client, _new_tenant

# vLLM's CPU KV block is 128 tokens: only whole blocks are cached, so the prompt is several.
BLOCK = 128
MAX_TOKENS = 4


def _long_prompt() -> str:
    # ~500 tokens: several whole blocks, and with max_tokens well inside the text pool's
    # 1024 (a longer request would run on text-long). A fresh first line: no earlier run
    # can have cached it.
    body = "\n".join(f"def helper_{i}(value):\n    return value * {i} + len(str(value))" for i in range(24))
    return f"# billing document {uuid.uuid4().hex}\n{body}\n"


def _spent(cluster: Cluster, tenant_id: str) -> int:
    client = redis.Redis.from_url(cluster.redis.url)
    try:
        return int(client.get(keys.daily_tokens(tenant_id, utc_day(time.time()))) or 0)
    finally:
        client.close()


def test_a_repeated_prompt_is_billed_at_the_cached_factor(cluster: Cluster, admin: httpx.Client) -> None:
    text = next(p for p in cluster.catalog.enabled_pools if p.name == "text")
    factor = text.cached_prompt_billing_factor
    tenant_id, key, _ = _new_tenant(admin)
    body = {"model": "phi-3.5-mini", "prompt": _long_prompt(), "max_tokens": MAX_TOKENS, "temperature": 0}
    with _client(cluster, key) as client:
        first = client.post("/v1/completions", json=body)
        assert first.status_code == 200, first.text
        usage1 = first.json()["usage"]
        assert 3 * BLOCK < usage1["prompt_tokens"] < text.engine.max_model_len - MAX_TOKENS
        assert usage1["prompt_tokens_details"]["cached_tokens"] == 0
        spent1 = _spent(cluster, tenant_id)
        assert spent1 == usage1["total_tokens"]

        second = client.post("/v1/completions", json=body)
        assert second.status_code == 200, second.text
        usage2 = second.json()["usage"]
        cached = usage2["prompt_tokens_details"]["cached_tokens"]
        assert cached >= 3 * BLOCK, usage2
        assert usage2["prompt_tokens"] == usage1["prompt_tokens"]
        spent2 = _spent(cluster, tenant_id) - spent1
        # The cached tokens at the factor, everything else in full.
        assert spent2 == usage2["total_tokens"] - (cached - math.ceil(cached * factor))
        assert spent2 < spent1

        report = client.get("/v1/usage")
        assert report.status_code == 200, report.text
        (row,) = report.json()["data"]
        assert (row["model"], row["requests"]) == ("phi-3.5-mini", 2)
        assert row["prompt_tokens"] == 2 * usage1["prompt_tokens"]
        assert row["cached_prompt_tokens"] == cached
        assert row["uncached_prompt_tokens"] == row["prompt_tokens"] - cached
        assert row["billed_tokens"] == spent1 + spent2
