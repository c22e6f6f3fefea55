"""Length-aware pools in-process (issue 13, item 2): one model name backed by a short and a long
pool; the gate routes each request by prompt tokens + max_tokens against the short pool's
context, through the real core over fake engines and a real redis-server.

The local catalog's phi-3.5-mini: `text` (max_model_len 1024) with `long_context_pool: text-long`
(2048). The fake engine counts one token per word (plus Phi-3's chat markers).
"""

from __future__ import annotations

import pytest

from services.errors import ContextLengthExceeded
from services.inference.generation import Caller
from services.pools.engine import GenerationResult
from tests.fakes.core import PlainShape, billed, chat_request, queue_depth
from tests.fakes.engine import fake_tokens
from tests.fakes.gateway import InProcessGateway

MODEL = "phi-3.5-mini"
SHORT_LIMIT = 1024


def _words(n: int) -> str:
    return " ".join(f"w{i}" for i in range(n))


def _prompt_tokens(text: str) -> int:
    return len(fake_tokens(f"<|user|>\n{text}<|end|>\n<|assistant|>\n"))


async def _run(gw: InProcessGateway, text: str, **sampling: int | bool) -> GenerationResult:
    pool = gw.core.router.resolve(MODEL)
    result, _ = await gw.core.runner.complete(
        Caller(gw.tenant), pool, chat_request(text, **sampling), PlainShape()
    )
    assert isinstance(result, GenerationResult)
    return result


@pytest.mark.parametrize(
    ("words", "max_tokens", "tier"),
    [
        (20, 50, "text"),  # fits the short pool
        (500, 600, "text-long"),  # prompt fits, prompt + max_tokens does not
        (500, None, "text"),  # no max_tokens: the prompt alone decides
        (1100, None, "text-long"),  # the prompt alone is beyond the short context
    ],
)
async def test_requests_run_on_the_pool_their_length_needs(
    inprocess_gateway: InProcessGateway, words: int, max_tokens: int | None, tier: str
) -> None:
    gw = inprocess_gateway
    text = _words(words)
    sampling = {"max_tokens": max_tokens} if max_tokens is not None else {}
    prompt = _prompt_tokens(text)
    assert (prompt + (max_tokens or 0) > SHORT_LIMIT or prompt >= SHORT_LIMIT) == (tier == "text-long")

    result = await _run(gw, text, **sampling)

    served = {name: len(engine.requests) for name, engine in gw.pools.engines.items()}
    assert served["text" if tier == "text-long" else "text-long"] == 0
    assert served[tier] == 1
    assert result.prompt_tokens == prompt and result.completion_tokens >= 1
    # Billed under the model the client called, whichever pool ran it; the slot is freed.
    assert await billed(gw.core, gw.tenant.id) == (1, prompt, result.completion_tokens)
    assert await queue_depth(gw.core, tier) == (0, 0)


async def test_an_answer_longer_than_the_short_context_is_generated_whole(
    inprocess_gateway: InProcessGateway,
) -> None:
    """max_tokens beyond the short pool's whole context: the long pool runs all of it."""
    result = await _run(inprocess_gateway, _words(10), max_tokens=1500, ignore_eos=True)
    assert result.completion_tokens == 1500 and result.finish_reason == "length"
    assert len(inprocess_gateway.pools.engines["text-long"].requests) == 1


async def test_beyond_the_long_context_is_refused_with_the_models_real_limit(
    inprocess_gateway: InProcessGateway,
) -> None:
    gw = inprocess_gateway
    with pytest.raises(ContextLengthExceeded) as refused:
        await _run(gw, _words(1500), max_tokens=1000)
    # Refused by the gate when it counts with the model's tokenizer, else by the long pool's
    # engine; never sent to the short pool, whose limit would be the wrong one to name.
    assert "maximum context length is 2048 tokens" in str(refused.value)
    assert not gw.pools.engines["text"].requests
    assert await billed(gw.core, gw.tenant.id) == (0, 0, 0)


async def test_the_model_list_shows_one_model_with_the_long_context(
    inprocess_gateway: InProcessGateway,
) -> None:
    gw = inprocess_gateway
    listing = (await gw.client.get("/v1/models", headers=gw.auth)).json()["data"]
    entries = [m for m in listing if m["root"] == MODEL]
    assert {m["id"] for m in entries} == {MODEL, "phi-3.5-mini-instruct", "microsoft/Phi-3.5-mini-instruct"}
    assert {m["max_model_len"] for m in entries} == {2048}
    assert {m["pool"] for m in entries} == {"text"}
    assert not any(m["pool"] == "text-long" for m in listing)
