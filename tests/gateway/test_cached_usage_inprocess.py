"""Cached prompt tokens through the whole app, in-process (issue 13, item 3): the real
gateway over fake engines whose prefix cache is per tenant salt, in blocks of 16 tokens
(tests/fakes/engine.py), on a real redis-server.

The same prompt twice: the second response reports cached tokens, /v1/usage and
/admin/usage show them, and the daily budget charges them at the text pool's
cached_prompt_billing_factor. From the attacker's side: a client cannot claim cached
tokens itself, and another tenant's identical prompt earns no discount.
"""

from __future__ import annotations

import math
import time
from typing import Any

from services.redis_store import keys
from services.tenancy.admission import utc_day
from services.tenancy.models import Tenant
from tests.fakes.engine import CACHE_BLOCK_TOKENS
from tests.fakes.gateway import InProcessGateway, sse_payloads

CHAT = "/v1/chat/completions"
MODEL = "phi-3.5-mini"
# 120 words: ~130 engine tokens, whole blocks of them cached on a repeat; short enough for
# the text pool's context (1024) with max_tokens.
SYSTEM = " ".join(f"rule{i}" for i in range(120))


def _chat(**extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "go"}]
    return {"model": MODEL, "messages": messages, "max_tokens": 4, **extra}


async def _spent(gw: InProcessGateway, tenant_id: str) -> int:
    day = utc_day(time.time())
    return int(await gw.core.redis.redis.get(keys.daily_tokens(tenant_id, day)) or 0)


async def _usage_row(gw: InProcessGateway, headers: dict[str, str]) -> dict[str, int]:
    report = await gw.client.get("/v1/usage", headers=headers)
    assert report.status_code == 200, report.text
    (row,) = report.json()["data"]
    return row  # type: ignore[no-any-return]


async def test_a_repeated_prompt_is_reported_and_billed_as_cached(
    inprocess_gateway: InProcessGateway,
) -> None:
    gw = inprocess_gateway
    factor = gw.core.router.resolve(MODEL).cached_prompt_billing_factor
    assert factor == 0.5
    first = await gw.client.post(CHAT, json=_chat(), headers=gw.auth)
    assert first.status_code == 200, first.text
    usage1 = first.json()["usage"]
    assert usage1["prompt_tokens_details"]["cached_tokens"] == 0
    spent1 = await _spent(gw, gw.tenant.id)
    assert spent1 == usage1["total_tokens"]  # nothing cached: charged in full

    second = await gw.client.post(CHAT, json=_chat(), headers=gw.auth)
    usage2 = second.json()["usage"]
    cached = usage2["prompt_tokens_details"]["cached_tokens"]
    assert cached >= 7 * CACHE_BLOCK_TOKENS and cached % CACHE_BLOCK_TOKENS == 0
    assert usage2["prompt_tokens"] == usage1["prompt_tokens"]  # prompt_tokens stays the total
    spent2 = await _spent(gw, gw.tenant.id) - spent1
    assert spent2 == usage2["total_tokens"] - (cached - math.ceil(cached * factor))
    assert spent1 - spent2 == cached // 2

    # Streamed: the usage chunk and the settlement see the same engine count.
    streamed = await gw.client.post(
        CHAT, json=_chat(stream=True, stream_options={"include_usage": True}), headers=gw.auth
    )
    usage3 = [p for p in sse_payloads(streamed.text) if isinstance(p, dict) and p.get("usage")][-1]["usage"]
    assert usage3["prompt_tokens_details"]["cached_tokens"] == cached

    row = await _usage_row(gw, gw.auth)
    assert row["requests"] == 3
    assert row["prompt_tokens"] == 3 * usage1["prompt_tokens"]
    assert row["cached_prompt_tokens"] == 2 * cached
    assert row["uncached_prompt_tokens"] == row["prompt_tokens"] - 2 * cached
    assert row["billed_tokens"] == await _spent(gw, gw.tenant.id)
    # The operator's view shows the same row.
    admin = await gw.client.get("/admin/usage", params={"tenant_id": gw.tenant.id}, headers=gw.admin)
    assert admin.status_code == 200, admin.text
    assert admin.json()["data"] == [row]


async def test_a_client_cannot_claim_cached_tokens(inprocess_gateway: InProcessGateway) -> None:
    """Only the engine's count is used: a body that claims a cached count is refused before
    admission, and the first request of a prompt pays in full."""
    gw = inprocess_gateway
    claims = (
        {"usage": {"prompt_tokens_details": {"cached_tokens": 10_000}}},
        {"prompt_tokens_details": {"cached_tokens": 10_000}},
        {"cached_tokens": 10_000},
    )
    for claim in claims:
        refused = await gw.client.post(CHAT, json=_chat(**claim), headers=gw.auth)
        assert refused.status_code == 400, refused.text
    assert await _spent(gw, gw.tenant.id) == 0
    paid = await gw.client.post(CHAT, json=_chat(), headers=gw.auth)
    assert paid.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert await _spent(gw, gw.tenant.id) == paid.json()["usage"]["total_tokens"]


async def test_another_tenants_identical_prompt_earns_no_discount(
    inprocess_gateway: InProcessGateway,
) -> None:
    gw = inprocess_gateway
    for _ in range(2):  # the prompt is in acme's cache now
        assert (await gw.client.post(CHAT, json=_chat(), headers=gw.auth)).status_code == 200
    other = {"Authorization": f"Bearer {await gw.add_tenant(Tenant(id='other'))}"}
    answer = await gw.client.post(CHAT, json=_chat(), headers=other)
    assert answer.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert await _spent(gw, "other") == answer.json()["usage"]["total_tokens"]
    assert (await _usage_row(gw, other))["cached_prompt_tokens"] == 0
