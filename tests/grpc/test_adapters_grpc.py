"""Tenants' LoRA adapters over gRPC (issue 14): the REST answer, unary and streamed, and
another tenant's adapter is NOT_FOUND with the details of a model that does not exist."""

from __future__ import annotations

import grpc
import httpx
import pytest

from services.grpc.client import Client, PhiserveRpcError, user
from tests.adapter_helpers import (
    BASE,
    MAX_TOKENS,
    PROMPT,
    chat_text,
    client,
    new_tenant,
    register,
    usage_by_model,
)
from tests.conftest import Cluster


def _refusal(call, model: str) -> tuple[object, ...]:  # type: ignore[no-untyped-def]
    with pytest.raises(PhiserveRpcError) as info:
        result = call(model)
        if not hasattr(result, "choices"):  # a stream: the error comes while iterating
            list(result)
    err = info.value
    return err.code, err.message.replace(model, "<model>"), err.error_code, err.param, err.reason


def test_chat_and_complete_with_an_adapter_over_grpc(
    cluster: Cluster, admin: httpx.Client, grpc_channel: grpc.Channel
) -> None:
    a_id, a_key = new_tenant(admin)
    _, b_key = new_tenant(admin)
    model = register(admin, a_id, "rpc", "tiny/phi-3.5-mini-1")
    a = Client(api_key=a_key, channel=grpc_channel, timeout_s=120)
    b = Client(api_key=b_key, channel=grpc_channel, timeout_s=120)
    with client(cluster, a_key) as http:
        rest = chat_text(http, model)
        assert rest != chat_text(http, BASE)
        options = {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
        unary = a.chat(model, [user(PROMPT)], **options)
        assert unary.model == model and unary.choices[0].message.text == rest
        chunks = list(a.chat_stream(model, [user(PROMPT)], **options))
        assert {c.model for c in chunks} == {model}
        assert "".join(c.choices[0].delta.content for c in chunks if c.choices) == rest
        completed = a.complete(model, PROMPT, max_tokens=4, temperature=0)
        streamed = list(a.complete_stream(model, PROMPT, max_tokens=4, temperature=0))
        assert completed.model == model
        assert "".join(c.choices[0].text for c in streamed if c.choices) == completed.choices[0].text
        assert usage_by_model(http) == {model: 5, BASE: 1}

    made_up = f"ft:{BASE}:{a_id}:no-such-adapter"
    for call in (
        lambda m: b.chat(m, [user(PROMPT)], max_tokens=2),
        lambda m: b.chat_stream(m, [user(PROMPT)], max_tokens=2),
        lambda m: b.complete(m, PROMPT, max_tokens=2),
        lambda m: b.complete_stream(m, PROMPT, max_tokens=2),
        lambda m: b.tokenize(m, prompt=PROMPT),
    ):
        stolen = _refusal(call, model)
        assert stolen[0] == grpc.StatusCode.NOT_FOUND and stolen[2] == "model_not_found", stolen
        assert stolen == _refusal(call, made_up) == _refusal(call, "no-such-model")
