"""The sampling surface through the real FastAPI app and core, in-process over fake engines
(tests/fakes/): n per choice in unary and streamed answers, prompt lists in OpenAI's order,
continuous usage, and the tenant's caps on n (choices and their price at admission).

The fake engine answers each prompt's words, one token each, so every choice's text and
token count is known in advance (tests/gateway/test_sampling_surface.py runs the same
surface on the real engine)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from services.tenancy.models import Tenant, TenantLimits
from tests.fakes.gateway import InProcessGateway, sse_payloads

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MODEL = "phi-3.5-mini"


def chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], **extra}


async def test_n_choices_streamed_each_with_its_role_and_finish(inprocess_gateway: InProcessGateway) -> None:
    gw = inprocess_gateway
    body = chat("one two three", n=3, stream=True, stream_options={"include_usage": True})
    answer = await gw.client.post(CHAT, json=body, headers=gw.auth)
    assert answer.status_code == 200, answer.text
    events = [e for e in sse_payloads(answer.text) if e != "[DONE]"]
    deltas: dict[int, list[dict[str, Any]]] = defaultdict(list)
    for event in events:
        for choice in event["choices"]:
            deltas[choice["index"]].append(choice)
    assert sorted(deltas) == [0, 1, 2]
    for choices in deltas.values():
        assert choices[0]["delta"]["role"] == "assistant"  # once per choice, on its first delta
        assert all("role" not in c["delta"] for c in choices[1:])
        assert "".join(c["delta"]["content"] for c in choices) == " one two three"
        assert [c["finish_reason"] for c in choices][-1] == "stop"
        assert all(c["finish_reason"] is None for c in choices[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 9


async def test_a_prompt_list_with_n_in_openai_order(inprocess_gateway: InProcessGateway) -> None:
    gw = inprocess_gateway
    body = {"model": MODEL, "prompt": ["alpha beta", "gamma"], "n": 2, "echo": True}
    answer = await gw.client.post(COMPLETIONS, json=body, headers=gw.auth)
    assert answer.status_code == 200, answer.text
    choices = answer.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2, 3]
    assert [c["text"] for c in choices] == [
        "alpha beta alpha beta",
        "alpha beta alpha beta",
        "gamma gamma",
        "gamma gamma",
    ]
    assert answer.json()["usage"]["completion_tokens"] == 2 + 2 + 1 + 1


async def test_continuous_usage_is_on_every_chunk(inprocess_gateway: InProcessGateway) -> None:
    gw = inprocess_gateway
    body = chat("a b c d", stream=True, stream_options={"continuous_usage_stats": True})
    answer = await gw.client.post(CHAT, json=body, headers=gw.auth)
    events = [e for e in sse_payloads(answer.text) if e != "[DONE]"]
    counts = [e["usage"]["completion_tokens"] for e in events]
    assert counts == sorted(counts) and counts[-1] == 4 and len(events) >= 1


async def test_the_tenants_cap_on_n_and_its_price(inprocess_gateway: InProcessGateway) -> None:
    gw = inprocess_gateway
    capped = {
        "Authorization": f"Bearer {await gw.add_tenant(Tenant(id='capped', limits=TenantLimits(max_n=2)))}"
    }
    assert (await gw.client.post(CHAT, json=chat("hi", n=2), headers=capped)).status_code == 200
    refused = await gw.client.post(CHAT, json=chat("hi", n=3), headers=capped)
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "n"
    # 200 tokens a minute: one choice of 40 tokens fits, eight are priced as eight.
    metered = {
        "Authorization": f"Bearer {await gw.add_tenant(Tenant(id='metered', limits=TenantLimits(tpm=200)))}"
    }
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 40}
    over = await gw.client.post(COMPLETIONS, json={**body, "n": 8}, headers=metered)
    assert over.status_code == 429 and over.json()["error"]["param"] == "request_exceeds_tpm"
    assert "max_tokens for each choice" in over.json()["error"]["message"]
    assert (await gw.client.post(COMPLETIONS, json={**body, "n": 1}, headers=metered)).status_code == 200


async def test_inconsistent_sampling_fields_are_400_naming_the_field(
    inprocess_gateway: InProcessGateway,
) -> None:
    gw = inprocess_gateway
    cases = [
        (CHAT, chat("hi", top_logprobs=2), "top_logprobs"),  # without logprobs: true
        (CHAT, chat("hi", logprobs=True, top_logprobs=21), "top_logprobs"),
        (COMPLETIONS, {"model": MODEL, "prompt": "hi", "logprobs": 21}, "logprobs"),
        (COMPLETIONS, {"model": MODEL, "prompt": "hi", "max_tokens": 4, "min_tokens": 5}, "min_tokens"),
        (
            COMPLETIONS,
            {"model": MODEL, "prompt": "hi", "max_tokens": 4, "max_completion_tokens": 5},
            "max_completion_tokens",
        ),
        (COMPLETIONS, {"model": MODEL, "prompt": [[1, 2], []]}, "prompt[1]"),
        (COMPLETIONS, {"model": MODEL, "prompt": [1, -2]}, "prompt"),
    ]
    for path, body, param in cases:
        answer = await gw.client.post(path, json=body, headers=gw.auth)
        assert answer.status_code == 400, (body, answer.text)
        assert answer.json()["error"]["param"] == param, (body, answer.text)
    assert gw.engine(MODEL).requests == []  # none of them reached the engine
