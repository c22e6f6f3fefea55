"""The FastAPI app end to end, in-process (issue 10, item 6): the real app, core and pool
replicas over fake engines (tests/fakes/), on a real redis-server; no Ray, seconds to run.

The fake engine answers the words of the last message, one token each, so every text,
finish reason and token count below is known in advance.
"""

from __future__ import annotations

import json
from typing import Any

from ray.serve.exceptions import BackPressureError

from services.tenancy.models import Tenant, TenantLimits
from tests.fakes.engine import CACHE_BLOCK_TOKENS, fake_tokens
from tests.fakes.gateway import InProcessGateway, sse_payloads

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MODEL = "phi-3.5-mini"


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


def chat_prompt_tokens(content: str) -> int:
    """What the engine counts for one user message (Phi-3's chat format)."""
    return len(fake_tokens(f"<|user|>\n{content}<|end|>\n<|assistant|>\n"))


async def test_chat_completion_carries_the_engines_text_and_token_counts(
    inprocess_gateway: InProcessGateway,
) -> None:
    gw = inprocess_gateway
    answer = await gw.client.post(CHAT, json=chat("the quick brown fox"), headers=gw.auth)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    assert body["choices"][0]["message"] == {"role": "assistant", "content": " the quick brown fox"}
    assert body["choices"][0]["finish_reason"] == "stop"
    # The engine's own count of the rendered prompt (not the gateway's estimate from length).
    prompt_tokens = chat_prompt_tokens("the quick brown fox")
    assert body["usage"] == {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": 4,
        "total_tokens": prompt_tokens + 4,
        "prompt_tokens_details": {"cached_tokens": 0},
    }
    # The request reached the text pool's engine with the tenant's salt and priority.
    (seen,) = gw.engine(MODEL).requests
    assert seen.cache_salt and seen.cache_salt != gw.tenant.id
    assert seen.priority == gw.tenant.priority_class.engine_priority


async def test_max_tokens_ends_with_length(inprocess_gateway: InProcessGateway) -> None:
    gw = inprocess_gateway
    answer = await gw.client.post(CHAT, json=chat("one two three four five", max_tokens=2), headers=gw.auth)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["choices"][0]["message"]["content"] == " one two"
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


async def test_chat_stream_is_sse_with_the_same_text_usage_and_done(
    inprocess_gateway: InProcessGateway,
) -> None:
    gw = inprocess_gateway
    request = chat("alpha beta gamma delta", stream=True, stream_options={"include_usage": True})
    answer = await gw.client.post(CHAT, json=request, headers=gw.auth)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/event-stream")
    events = sse_payloads(answer.text)
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if isinstance(e, dict) and e["choices"]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == " alpha beta gamma delta"
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert len({c["id"] for c in chunks}) == 1
    usage_events = [e for e in events[:-1] if isinstance(e, dict) and not e["choices"]]
    assert [u["usage"]["completion_tokens"] for u in usage_events] == [4]
    assert usage_events[0]["usage"]["prompt_tokens"] == chat_prompt_tokens("alpha beta gamma delta")


async def test_completions_unary_and_stream_cut_at_the_stop_string(
    inprocess_gateway: InProcessGateway,
) -> None:
    gw = inprocess_gateway
    request = {"model": MODEL, "prompt": "red green blue yellow", "stop": [" blue"]}
    unary = await gw.client.post(COMPLETIONS, json=request, headers=gw.auth)
    assert unary.status_code == 200, unary.text
    choice = unary.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == (" red green", "stop")

    streamed = await gw.client.post(COMPLETIONS, json={**request, "stream": True}, headers=gw.auth)
    assert streamed.status_code == 200, streamed.text
    events = sse_payloads(streamed.text)
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == " red green"
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


async def test_an_error_after_the_stream_started_is_an_sse_error_event(
    inprocess_gateway: InProcessGateway,
) -> None:
    gw = inprocess_gateway
    engine = gw.engine(MODEL)
    engine.fail_after_tokens = 1
    answer = await gw.client.post(CHAT, json=chat("one two three", stream=True), headers=gw.auth)
    # The status line went out with the first chunk; the failure follows as an event.
    assert answer.status_code == 200
    events = sse_payloads(answer.text)
    assert events[0]["choices"][0]["delta"]["content"] == " one"
    assert events[-2] == {
        "error": {
            "message": "the engine failed to generate a response",
            "type": "server_error",
            "param": None,
            "code": "generation_failed",
        }
    }
    assert events[-1] == "[DONE]"
    assert engine.running == 0


async def test_an_error_before_the_first_chunk_keeps_its_status(inprocess_gateway: InProcessGateway) -> None:
    gw = inprocess_gateway
    # The engine refuses prompt + max_tokens beyond the context (2,048) before any output.
    answer = await gw.client.post(CHAT, json=chat("hi", max_tokens=2047, stream=True), headers=gw.auth)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["code"] == "context_length_exceeded"
    assert answer.json()["error"]["param"] == "max_tokens"


async def test_requests_without_a_valid_key_get_401_and_reach_no_engine(
    inprocess_gateway: InProcessGateway,
) -> None:
    gw = inprocess_gateway
    missing = await gw.client.post(CHAT, json=chat("hello"))
    wrong = await gw.client.post(CHAT, json=chat("hello"), headers={"Authorization": "Bearer psk-not-a-key"})
    for answer, code in ((missing, "missing_api_key"), (wrong, "invalid_api_key")):
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"]["type"] == "authentication_error"
        assert answer.json()["error"]["code"] == code
    assert all(not engine.requests for engine in gw.pools.engines.values())


async def test_over_the_request_limit_is_429_with_retry_after(inprocess_gateway: InProcessGateway) -> None:
    gw = inprocess_gateway
    key = await gw.add_tenant(Tenant(id="limited", limits=TenantLimits(rpm=1)))
    auth = {"Authorization": f"Bearer {key}"}
    first = await gw.client.post(CHAT, json=chat("hello"), headers=auth)
    assert first.status_code == 200, first.text
    assert first.headers["x-ratelimit-limit-requests"] == "1"
    assert first.headers["x-ratelimit-remaining-requests"] == "0"
    second = await gw.client.post(CHAT, json=chat("hello"), headers=auth)
    assert second.status_code == 429, second.text
    assert second.json()["error"]["type"] == "rate_limit_error"
    assert second.json()["error"]["code"] == "rate_limit_exceeded"
    assert 1 <= int(second.headers["Retry-After"]) <= 60
    # Another tenant is not limited by it.
    assert (await gw.client.post(CHAT, json=chat("hello"), headers=gw.auth)).status_code == 200
    assert len(gw.engine(MODEL).requests) == 2


async def test_models_list_is_public_and_names_every_served_model(
    inprocess_gateway: InProcessGateway,
) -> None:
    gw = inprocess_gateway
    answer = await gw.client.get("/v1/models")
    assert answer.status_code == 200, answer.text
    listed = {m["id"]: m for m in answer.json()["data"]}
    expected = {name for pool in gw.core.catalog.enabled_pools for name in pool.names}
    assert set(listed) == expected
    assert listed["phi-3.5-vision"]["modality"] == "vision"
    assert listed["microsoft/Phi-3.5-mini-instruct"]["pool"] == "text"


async def test_unknown_model_is_404(inprocess_gateway: InProcessGateway) -> None:
    gw = inprocess_gateway
    answer = await gw.client.post(CHAT, json={**chat("hello"), "model": "gpt-4"}, headers=gw.auth)
    assert answer.status_code == 404, answer.text
    assert answer.json()["error"]["code"] == "model_not_found"
    assert answer.json()["error"]["param"] == "model"


async def test_a_pool_refusing_work_is_503_with_retry_after(inprocess_gateway: InProcessGateway) -> None:
    gw = inprocess_gateway
    gw.handle("text").fail_assignment(BackPressureError(num_queued_requests=64, max_queued_requests=64))
    answer = await gw.client.post(CHAT, json=chat("hello"), headers=gw.auth)
    assert answer.status_code == 503, answer.text
    assert answer.json()["error"]["code"] == "overloaded"
    assert answer.headers["Retry-After"] == "5"
    # The other pools still serve.
    moe = await gw.client.post(CHAT, json={**chat("hello"), "model": "phi-3.5-moe"}, headers=gw.auth)
    assert moe.status_code == 200, moe.text


async def test_ready_reports_a_dead_engine(inprocess_gateway: InProcessGateway) -> None:
    gw = inprocess_gateway
    assert (await gw.client.get("/ready")).json() == {
        "status": "ready",
        "pools": {"text": "ready", "moe": "ready", "vision": "ready", "text-long": "ready"},
    }
    gw.pools.engines["vision"].dead = True
    answer = await gw.client.get("/ready")
    assert answer.status_code == 503
    assert answer.json()["pools"] == {
        "text": "ready",
        "moe": "ready",
        "vision": "unavailable",
        "text-long": "ready",
    }


async def test_a_repeated_prompt_is_cached_for_its_tenant_only(inprocess_gateway: InProcessGateway) -> None:
    gw = inprocess_gateway
    content = " ".join(f"word{i}" for i in range(40))
    other = {"Authorization": f"Bearer {await gw.add_tenant(Tenant(id='other'))}"}

    async def cached(headers: dict[str, str]) -> int:
        answer = await gw.client.post(CHAT, json=chat(content, max_tokens=1), headers=headers)
        assert answer.status_code == 200, answer.text
        return int(answer.json()["usage"]["prompt_tokens_details"]["cached_tokens"])

    assert await cached(gw.auth) == 0
    again = await cached(gw.auth)
    assert again > 0 and again % CACHE_BLOCK_TOKENS == 0
    # The same prompt from another tenant: another salt, no hit.
    assert await cached(other) == 0


async def test_usage_route_reports_what_was_billed(inprocess_gateway: InProcessGateway) -> None:
    gw = inprocess_gateway
    assert (await gw.client.post(CHAT, json=chat("one two three"), headers=gw.auth)).status_code == 200
    report = await gw.client.get("/v1/usage", headers=gw.auth)
    assert report.status_code == 200, report.text
    text = json.dumps(report.json())
    assert MODEL in text
    assert f'"prompt_tokens": {chat_prompt_tokens("one two three")}' in text
    assert '"completion_tokens": 3' in text
