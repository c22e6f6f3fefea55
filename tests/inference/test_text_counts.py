"""Admission counts a conversation's earlier messages once per tenant (issue 12, item 2).

A chat request carries its whole history, so without a cache every turn encodes every
earlier message again. The counter keeps each text's count per tenant (its prefix-cache
salt) and pool: the next turn encodes only what is new, the total stays what encoding all
of it gives, and no tenant is answered from another tenant's counts. The tokenizer is the
tiny models' format (tests/fakes/tokenizer.py), wrapped to record what it was asked to
encode and on which thread.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer

from services.catalog.loader import load_catalog
from services.catalog.models import PoolConfig
from services.inference.tokens import TOKENS_PER_MESSAGE, TOKENS_PER_PROMPT, TextCounts, TokenCounter
from services.pools.engine import ChatMessage, GenerationRequest, SamplingOptions
from tests.fakes.tokenizer import write_tokenizer_files
from tests.helpers import OffLoopProbe

HISTORY = [
    "Once upon a time there was a tiny model that counted tokens.",
    "Say hello to the user, and answer in a word.",
    "The quick brown fox jumps over the lazy dog; 0123456789.",
]


class _RecordingTokenizer:
    """The real tokenizer; `encoded` lists every text it encoded, in order."""

    def __init__(self, tokenizer: Tokenizer, loop: asyncio.AbstractEventLoop) -> None:
        self._tokenizer = tokenizer
        self.encoded: list[str] = []
        self.encode = OffLoopProbe(self._encode, loop)
        self.encode_batch = OffLoopProbe(self._encode_batch, loop)

    def _encode(self, text: str, **kwargs: Any) -> Any:
        self.encoded.append(text)
        return self._tokenizer.encode(text, **kwargs)

    def _encode_batch(self, texts: list[str], **kwargs: Any) -> Any:
        self.encoded.extend(texts)
        return self._tokenizer.encode_batch(texts, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)


@pytest.fixture
def text_pool() -> PoolConfig:
    return next(p for p in load_catalog("local").enabled_pools if p.name == "text")


@pytest.fixture
def tokenizer(tmp_path: Path) -> Tokenizer:
    write_tokenizer_files(tmp_path / "model")
    return Tokenizer.from_file(str(tmp_path / "model" / "tokenizer.json"))


def _chat(texts: list[str], salt: str | None) -> GenerationRequest:
    return GenerationRequest(
        request_id="r",
        model="phi-3.5-mini",
        sampling=SamplingOptions(max_tokens=8),
        messages=tuple(ChatMessage(role="user", text=t) for t in texts),
        cache_salt=salt,
    )


def _expected(tokenizer: Tokenizer, texts: list[str]) -> int:
    encoded = sum(len(tokenizer.encode(t, add_special_tokens=False).ids) for t in texts)
    return encoded + TOKENS_PER_MESSAGE * len(texts) + TOKENS_PER_PROMPT


def _counter(pool: PoolConfig, recording: _RecordingTokenizer, **options: Any) -> TokenCounter:
    return TokenCounter({pool.name: recording}, {pool.name: 4}, **options)


async def test_the_next_turn_encodes_only_the_new_message(
    text_pool: PoolConfig, tokenizer: Tokenizer
) -> None:
    recording = _RecordingTokenizer(tokenizer, asyncio.get_running_loop())
    counter = _counter(text_pool, recording)
    first = await counter.count(text_pool, _chat(HISTORY[:2], "salt-a"))
    assert first == _expected(tokenizer, HISTORY[:2])
    assert recording.encoded == HISTORY[:2]
    recording.encoded.clear()
    second = await counter.count(text_pool, _chat(HISTORY, "salt-a"))
    assert second == _expected(tokenizer, HISTORY)  # the same total as encoding all of it
    assert recording.encoded == HISTORY[2:]


async def test_no_tenant_is_counted_from_another_tenants_texts(
    text_pool: PoolConfig, tokenizer: Tokenizer
) -> None:
    recording = _RecordingTokenizer(tokenizer, asyncio.get_running_loop())
    counter = _counter(text_pool, recording)
    await counter.count(text_pool, _chat(HISTORY, "salt-a"))
    recording.encoded.clear()
    assert await counter.count(text_pool, _chat(HISTORY, "salt-b")) == _expected(tokenizer, HISTORY)
    assert recording.encoded == HISTORY  # all encoded again: tenant b's timing says nothing of a
    recording.encoded.clear()
    # A request with no tenant salt (no cache key) is never answered from the cache.
    await counter.count(text_pool, _chat(HISTORY, None))
    await counter.count(text_pool, _chat(HISTORY, None))
    assert recording.encoded == HISTORY + HISTORY


async def test_a_long_history_counted_before_stays_on_the_loop(
    text_pool: PoolConfig, tokenizer: Tokenizer
) -> None:
    """The thread hop is for a lot of text to encode; a long conversation whose earlier turns
    are counted already has only its new message left."""
    recording = _RecordingTokenizer(tokenizer, asyncio.get_running_loop())
    long_history = [text * 20 for text in HISTORY]  # ~3,200 characters
    counter = _counter(text_pool, recording, off_loop_chars=1000)
    await counter.count(text_pool, _chat(long_history, "salt-a"))
    recording.encode_batch.assert_off_loop()
    assert await counter.count(text_pool, _chat([*long_history, "And then?"], "salt-a")) == _expected(
        tokenizer, [*long_history, "And then?"]
    )
    assert recording.encoded[-1] == "And then?"
    assert recording.encode.calls_on_loop == 1 and recording.encode.calls == 1


def test_the_counts_are_bounded_by_characters_least_recently_used_first() -> None:
    counts = TextCounts(max_chars=16_000)
    texts = [f"{i:04d}" + "x" * 896 for i in range(40)]  # 40 x ~1,000 characters with overhead
    for i, text in enumerate(texts):
        counts.put("salt", "text", text, i)
        assert counts.get("salt", "text", texts[0]) == 0  # used each time: kept
    assert counts.chars <= 16_000
    assert counts.get("salt", "text", texts[-1]) == 39
    assert counts.get("salt", "text", texts[1]) is None  # the least recently used went first
    counts.put("salt", "text", "y" * 1001, 7)  # longer than a sixteenth of the budget: not kept
    assert counts.get("salt", "text", "y" * 1001) is None
