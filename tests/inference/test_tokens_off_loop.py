"""Counting a huge prompt's tokens does not stall the gateway's event loop (issue 9, item 4).

The real tenant gate with the text pool's real tokenizer (the tiny model's tokenizer.json)
on real Redis: while one tenant's long prompt is priced, the event loop (which serves every
other request on the replica) must stay free. The probe shows on which thread the tokenizer
ran, not how long it took, so the answer does not depend on the machine's speed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from services.catalog.loader import load_catalog
from services.errors import ContextLengthExceeded
from services.inference.gate import TenantGate
from services.inference.metrics import GatewayMetrics
from services.inference.tokens import TokenCounter
from services.pools.engine import ChatMessage, GenerationRequest, SamplingOptions
from services.redis_store import RedisStore
from services.tenancy.models import Tenant
from tests.helpers import OffLoopProbe, real_gate


class _ProbedTokenizer:
    """The real tokenizer, with its encoding watched by an OffLoopProbe."""

    def __init__(self, tokenizer: Any, probe_loop: asyncio.AbstractEventLoop) -> None:
        self._tokenizer = tokenizer
        self.encode_batch = OffLoopProbe(tokenizer.encode_batch, probe_loop)
        self.encode = OffLoopProbe(tokenizer.encode, probe_loop)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


def _text_gate(
    state: RedisStore, tiny_models: dict[str, Path], *, probe_loop: asyncio.AbstractEventLoop | None = None
) -> tuple[TenantGate, Any, _ProbedTokenizer | None]:
    catalog = load_catalog("local")
    text_pool = next(p for p in catalog.enabled_pools if p.name == "text")
    model_dir = next(iter(tiny_models.values())).parent
    counter = TokenCounter.for_pools([text_pool], model_dir)
    probed = None
    if probe_loop is not None:
        probed = _ProbedTokenizer(counter._tokenizers[text_pool.name], probe_loop)
        counter = TokenCounter({text_pool.name: probed}, {text_pool.name: 4})
    metrics = GatewayMetrics()
    gate = real_gate(state, {"text": 4}, metrics, counter=counter)
    return gate, text_pool, probed


async def test_a_prompt_too_long_for_any_tokenisation_is_refused_uncounted(
    state: RedisStore, tiny_models: dict[str, Path]
) -> None:
    gate, text_pool, _ = _text_gate(state, tiny_models)
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


async def test_a_huge_prompt_is_counted_off_the_loop(state: RedisStore, tiny_models: dict[str, Path]) -> None:
    gate, text_pool, probed = _text_gate(state, tiny_models, probe_loop=asyncio.get_running_loop())
    assert probed is not None
    # ~150 KB, below the character bound (2048 tokens x the longest vocabulary entry) so it
    # is tokenised: this tokenizer (like Phi's, no pre-tokenizer split) takes ~1 s on it.
    words = " ".join(f"word{i % 997} and some more prose" for i in range(5_500))
    request = GenerationRequest(
        request_id="r1",
        model="phi-3.5-mini",
        sampling=SamplingOptions(max_tokens=16),
        messages=(ChatMessage(role="user", text=words),),
    )
    with pytest.raises(ContextLengthExceeded) as refused:
        await gate.enter(Tenant(id="bulk"), text_pool, request, deadline_s=None)
    assert "longer in characters" not in refused.value.message  # it was counted, then refused
    probed.encode_batch.assert_off_loop()
    assert probed.encode.calls == 0  # all of it in the one batch, on the counting thread


async def test_a_short_prompt_is_counted_on_the_loop(state: RedisStore, tiny_models: dict[str, Path]) -> None:
    """The control: the probe does see work on the loop (a hop to a thread costs more than
    counting a chat message, so short prompts stay there, encoded one text at a time:
    `encode_batch` would hand them to the tokenizer's own threads and wait)."""
    gate, text_pool, probed = _text_gate(state, tiny_models, probe_loop=asyncio.get_running_loop())
    assert probed is not None
    request = GenerationRequest(
        request_id="r3",
        model="phi-3.5-mini",
        sampling=SamplingOptions(max_tokens=16),
        messages=(ChatMessage(role="user", text="hello there"),),
    )
    admitted = await gate.enter(Tenant(id="chat"), text_pool, request, deadline_s=None)
    await gate.leave(admitted, prompt_tokens=0, completion_tokens=0)
    assert probed.encode.calls_on_loop == 1
    assert probed.encode_batch.calls == 0
