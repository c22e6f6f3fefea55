"""The generation runner in-process (issue 10, item 6): unary and streamed generations through
the real core (gate, router, replica hop) over fake engines, on a real redis-server.

The fake engine answers the words of the last message, one token each; its counts are the
ones the runner must report and bill.
"""

from __future__ import annotations

import pytest

from services.errors import ContextLengthExceeded, GenerationFailed
from services.inference.generation import Caller
from services.pools.engine import GenerationResult
from tests.fakes.core import PlainShape, billed, chat_request, queue_depth, until
from tests.fakes.engine import CACHE_BLOCK_TOKENS, fake_tokens
from tests.fakes.gateway import InProcessGateway

MODEL = "phi-3.5-mini"


def _prompt_tokens(text: str) -> int:
    return len(fake_tokens(f"<|user|>\n{text}<|end|>\n<|assistant|>\n"))


async def test_unary_returns_the_engines_result_and_bills_its_counts(
    inprocess_gateway: InProcessGateway,
) -> None:
    gw = inprocess_gateway
    pool = gw.core.router.resolve(MODEL)
    caller = Caller(gw.tenant)
    result, headers = await gw.core.runner.complete(caller, pool, chat_request("a b c d e"), PlainShape())
    assert isinstance(result, GenerationResult)
    assert (result.text, result.finish_reason) == (" a b c d e", "stop")
    assert (result.prompt_tokens, result.completion_tokens) == (_prompt_tokens("a b c d e"), 5)
    assert isinstance(headers, dict)
    assert caller.labels["model"] == MODEL  # the middleware records the response under it
    assert await billed(gw.core, gw.tenant.id) == (1, _prompt_tokens("a b c d e"), 5)
    assert await queue_depth(gw.core, "text") == (0, 0)


async def test_a_stream_yields_shaped_chunks_then_usage_with_cached_tokens(
    inprocess_gateway: InProcessGateway,
) -> None:
    gw = inprocess_gateway
    pool = gw.core.router.resolve(MODEL)
    text = " ".join(f"w{i}" for i in range(40))
    request = chat_request(text, max_tokens=3)
    await gw.core.runner.complete(Caller(gw.tenant), pool, request, PlainShape())  # warms the cache
    stream, _ = await gw.core.runner.open_stream(
        Caller(gw.tenant), pool, request, PlainShape(), include_usage=True
    )
    payloads = [p async for p in stream]
    *chunks, last = payloads
    assert chunks[0][2] is True and all(first is False for _, _, first in chunks[1:])
    assert "".join(t for t, _, _ in chunks) == " w0 w1 w2"
    assert chunks[-1][1] == "length"
    usage = last["usage"]
    assert usage["prompt_tokens"] == _prompt_tokens(text)
    assert usage["completion_tokens"] == 3
    assert usage["total_tokens"] == usage["prompt_tokens"] + 3
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < usage["prompt_tokens"] and cached % CACHE_BLOCK_TOKENS == 0
    assert await billed(gw.core, gw.tenant.id) == (2, 2 * _prompt_tokens(text), 6)


async def test_without_include_usage_there_is_no_usage_chunk(inprocess_gateway: InProcessGateway) -> None:
    gw = inprocess_gateway
    pool = gw.core.router.resolve(MODEL)
    stream, _ = await gw.core.runner.open_stream(
        Caller(gw.tenant), pool, chat_request("x y"), PlainShape(), include_usage=False
    )
    payloads = [p async for p in stream]
    assert all(isinstance(p, tuple) for p in payloads)
    assert "".join(t for t, _, _ in payloads) == " x y"


async def test_an_error_mid_stream_is_raised_from_the_iterator_and_settles(
    inprocess_gateway: InProcessGateway,
) -> None:
    gw = inprocess_gateway
    engine = gw.engine(MODEL)
    engine.fail_after_tokens = 1
    pool = gw.core.router.resolve(MODEL)
    # The first chunk came: the stream opens (the status line can still say 200).
    stream, _ = await gw.core.runner.open_stream(
        Caller(gw.tenant), pool, chat_request("one two three"), PlainShape(), include_usage=True
    )
    received = []
    with pytest.raises(GenerationFailed):
        async for payload in stream:
            received.append(payload)
    assert received == [(" one", None, True)]  # no usage chunk after a failure
    await until(lambda: _idle(gw), what="the slot released")
    # What was generated before the failure is billed: the prompt and one token.
    assert await billed(gw.core, gw.tenant.id) == (1, _prompt_tokens("one two three"), 1)


async def test_an_error_before_the_first_chunk_is_raised_by_open_stream(
    inprocess_gateway: InProcessGateway,
) -> None:
    gw = inprocess_gateway
    pool = gw.core.router.resolve(MODEL)
    with pytest.raises(ContextLengthExceeded):
        await gw.core.runner.open_stream(
            Caller(gw.tenant), pool, chat_request("hi", max_tokens=2047), PlainShape(), include_usage=False
        )
    assert await queue_depth(gw.core, "text") == (0, 0)
    assert await billed(gw.core, gw.tenant.id) == (0, 0, 0)  # refused by the engine: free


async def test_a_stream_closed_early_aborts_the_engine_and_bills_what_was_made(
    inprocess_gateway: InProcessGateway,
) -> None:
    gw = inprocess_gateway
    engine = gw.engine(MODEL)
    engine.token_delay_s = 0.005
    pool = gw.core.router.resolve(MODEL)
    text = " ".join(["word"] * 500)  # leaves the short pool ~500 tokens to generate
    stream, _ = await gw.core.runner.open_stream(
        Caller(gw.tenant), pool, chat_request(text), PlainShape(), include_usage=False
    )
    assert await anext(stream) == (" word", None, True)
    await stream.aclose()  # type: ignore[attr-defined]
    await until(lambda: engine.aborted, what="the engine request aborted")
    await until(lambda: _idle(gw), what="the slot released")
    assert engine.running == 0 and not engine.finished
    requests, prompt, completion = await billed(gw.core, gw.tenant.id)
    assert (requests, prompt) == (1, _prompt_tokens(text))
    assert 1 <= completion < 500


async def _idle(gw: InProcessGateway) -> bool:
    return await queue_depth(gw.core, "text") == (0, 0) and not gw.core.keeper._active
