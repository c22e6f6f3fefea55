"""Counting a huge prompt's tokens does not stall the gateway's event loop (issue 9, item 4).

The real tenant gate with the text pool's real tokenizer (the tiny model's tokenizer.json)
on real Redis: while one tenant's multi-megabyte prompt is priced, a ticker on the same
loop (standing in for every other request on the replica) must keep running.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.catalog.loader import load_catalog
from services.errors import ContextLengthExceeded, InvalidRequest
from services.gateway.gate import LeaseKeeper, TenantGate
from services.gateway.metrics import GatewayMetrics
from services.gateway.tokens import TokenCounter
from services.pools.engine import ChatMessage, GenerationRequest, SamplingOptions
from services.tenancy.admission import Admission
from services.tenancy.fair_queue import FairQueue
from services.tenancy.models import Tenant
from services.tenancy.redis_state import RedisState
from tests.helpers import LoopStallMeter


def _text_gate(state: RedisState, tiny_models: dict[str, Path]) -> tuple[TenantGate, Any]:
    catalog = load_catalog("local")
    text_pool = next(p for p in catalog.enabled_pools if p.name == "text")
    model_dir = next(iter(tiny_models.values())).parent
    counter = TokenCounter.for_pools([text_pool], model_dir)
    metrics = GatewayMetrics()
    admission = Admission(state, lease_ttl_s=30)
    fair_queue = FairQueue(state, {"text": 4}, max_waiting=10, lease_ttl_s=30)
    keeper = LeaseKeeper(admission, fair_queue, metrics, pools=["text"], interval_s=60)
    return TenantGate(admission, fair_queue, counter, keeper, metrics, queue_timeout_s=5), text_pool


async def test_a_prompt_too_long_for_any_tokenisation_is_refused_uncounted(
    state: RedisState, tiny_models: dict[str, Path]
) -> None:
    gate, text_pool = _text_gate(state, tiny_models)
    # 4 MiB: tokenising it would hold a gateway thread for about a minute.
    request = GenerationRequest(
        request_id="r2",
        model="phi-3.5-mini",
        sampling=SamplingOptions(max_tokens=16),
        messages=(ChatMessage(role="user", text="x" * (4 << 20)),),
    )
    with pytest.raises(ContextLengthExceeded) as refused:
        await gate.enter(Tenant(id="bulk"), text_pool, request, deadline_s=None)
    assert refused.value.param == "messages"
    assert "longer in characters" in refused.value.message  # the path that never tokenises


async def test_a_huge_prompt_is_counted_off_the_loop(
    state: RedisState, tiny_models: dict[str, Path]
) -> None:
    gate, text_pool = _text_gate(state, tiny_models)
    # ~150 KB, below the character bound (2048 tokens x the longest vocabulary entry) so
    # it is tokenised: this tokenizer (like Phi's, no pre-tokenizer split) takes ~1 s on it.
    words = " ".join(f"word{i % 997} and some more prose" for i in range(5_500))
    request = GenerationRequest(
        request_id="r1",
        model="phi-3.5-mini",
        sampling=SamplingOptions(max_tokens=16),
        messages=(ChatMessage(role="user", text=words),),
    )
    async with LoopStallMeter() as meter:
        try:
            admitted = await gate.enter(Tenant(id="bulk"), text_pool, request, deadline_s=None)
            await gate.leave(admitted, prompt_tokens=0, completion_tokens=0)
        except InvalidRequest:
            pass  # beyond the model's context: refused after counting, which is what is timed
    longest_gap, took = meter.longest_gap, meter.took
    assert took > 0.15, f"counting took {took:.2f} s: too small a prompt to show anything"
    assert longest_gap < max(0.15, took / 4), f"loop stalled {longest_gap:.2f} s of {took:.2f} s"
