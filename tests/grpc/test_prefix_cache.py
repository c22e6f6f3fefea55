"""The per-tenant prefix cache over gRPC (issue 9, item 6): Usage.prompt_tokens_details."""

from __future__ import annotations

import grpc
import httpx

from services.grpc.client import Client
from tests.gateway.test_prefix_cache import MIN_PROMPT_TOKENS, _long_prompt
from tests.grpc.conftest import new_tenant


def test_cached_tokens_are_reported_and_never_another_tenants(
    grpc_channel: grpc.Channel, admin: httpx.Client
) -> None:
    _, a_key = new_tenant(admin)
    _, b_key = new_tenant(admin)
    a = Client(api_key=a_key, channel=grpc_channel, timeout_s=60)
    b = Client(api_key=b_key, channel=grpc_channel, timeout_s=60)
    prompt = _long_prompt()
    first = a.complete("phi-3.5-mini", prompt, max_tokens=1, temperature=0)
    assert first.usage.prompt_tokens >= MIN_PROMPT_TOKENS
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    again = a.complete("phi-3.5-mini", prompt, max_tokens=1, temperature=0)
    assert again.usage.prompt_tokens_details.cached_tokens >= MIN_PROMPT_TOKENS - 128
    other = b.complete("phi-3.5-mini", prompt, max_tokens=1, temperature=0)
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    streamed = list(
        b.complete_stream("phi-3.5-mini", prompt, include_usage=True, max_tokens=1, temperature=0)
    )
    assert streamed[-1].usage.prompt_tokens_details.cached_tokens >= MIN_PROMPT_TOKENS - 128
