"""The sampling surface at parity with vLLM (issue 11, item 3), from the client's side: the
official openai SDK against the real cluster on the tiny model, each parameter asserted by
its documented effect.

The tiny model's weights are random, so its greedy text is noise, but deterministic: the
tests read what greedy decoding produces, then show what a parameter changes in it. Token
ids come from the model's own tokenizer.json (the `tokenizers` library), with the text vLLM
gives each id in logprobs (its `convert_ids_list_to_tokens`: the id decoded alone, with the
leading spaces of its SentencePiece piece restored).
"""

from __future__ import annotations

import json
import uuid
from collections import defaultdict
from functools import cache

import httpx
import pytest
from openai import OpenAI
from tokenizers import Tokenizer

from tests.conftest import CACHE_DIR, Cluster
from tests.gateway.test_tenancy_e2e import _client, _new_tenant

MODEL = "phi-3.5-mini"
TOKENIZER = CACHE_DIR / "models" / "phi-3.5-mini-tiny" / "tokenizer.json"
EOS = 32000  # the tiny model's <|endoftext|> (config.json eos_token_id)
PROMPT = "def fibonacci(n):"
CHAT = [{"role": "user", "content": "Count to ten"}]


@cache
def _tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(TOKENIZER))


def _token_text(token_id: int) -> str:
    """The text vLLM's logprobs give `token_id`."""
    tok = _tokenizer()
    text = tok.decode([token_id], skip_special_tokens=False)
    piece = tok.id_to_token(token_id) or ""
    markers = len(piece) - len(piece.lstrip("\u2581"))
    missing = markers - (len(text) - len(text.lstrip(" ")))
    return " " * max(missing, 0) + text


@cache
def _ids_by_text() -> dict[str, list[int]]:
    found: dict[str, list[int]] = defaultdict(list)
    for token_id in range(_tokenizer().get_vocab_size(with_added_tokens=True)):
        found[_token_text(token_id)].append(token_id)
    return found


def _unique_id(text: str) -> int | None:
    """The one id whose logprob text is `text`, or None when several (or none) are."""
    ids = _ids_by_text().get(text, [])
    return ids[0] if len(ids) == 1 and text.strip() else None


def _greedy(client: OpenAI, max_tokens: int = 12, **extra: object) -> tuple[str, list[str]]:
    """The text and token texts greedy decoding gives PROMPT (ignore_eos: always max_tokens)."""
    resp = client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=max_tokens,
        temperature=0,
        logprobs=0,
        extra_body={"ignore_eos": True, **extra},
    )
    assert resp.choices[0].logprobs is not None
    return resp.choices[0].text, list(resp.choices[0].logprobs.tokens or [])


def _pick_position(tokens: list[str]) -> tuple[int, int]:
    """A position k > 0 whose token has an id of its own and does not occur before k."""
    for k, text in enumerate(tokens[1:], start=1):
        token_id = _unique_id(text)
        if token_id is not None and text not in tokens[:k]:
            return k, token_id
    raise AssertionError(f"no greedy token with an id of its own in {tokens!r}")


def _sse(client: httpx.Client, path: str, body: dict) -> list[dict]:  # type: ignore[type-arg]
    with client.stream("POST", path, json={**body, "stream": True}) as resp:
        assert resp.status_code == 200, resp.read().decode()
        return [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]


# -- logprobs ------------------------------------------------------------------------------


def test_chat_logprobs_give_each_token_and_its_top_alternatives(openai_client: OpenAI) -> None:
    resp = openai_client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=10,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    choice = resp.choices[0]
    assert choice.logprobs is not None and choice.logprobs.content is not None
    entries = choice.logprobs.content
    assert len(entries) == resp.usage.completion_tokens == 10
    for entry in entries:
        tops = entry.top_logprobs
        assert len(tops) == 3
        assert [t.logprob for t in tops] == sorted((t.logprob for t in tops), reverse=True)
        # Greedy: the sampled token is the most likely one.
        assert entry.logprob <= tops[0].logprob + 1e-6
        assert entry.logprob == pytest.approx(tops[0].logprob, abs=1e-4)
        assert entry.bytes == list(entry.token.encode())
        assert all(t.bytes == list(t.token.encode()) for t in tops)
    # Without logprobs, none are sent.
    plain = openai_client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_streamed_chat_carries_logprobs_per_chunk(openai_client: OpenAI) -> None:
    stream = openai_client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    chunks = list(stream)
    content = [c for c in chunks if c.choices]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12
    counted = 0
    for chunk in content:
        logprobs = chunk.choices[0].logprobs
        assert logprobs is not None and logprobs.content, "every chunk with text carries its tokens"
        assert all(len(entry.top_logprobs) == 2 for entry in logprobs.content)
        counted += len(logprobs.content)
    assert counted == 12


def test_completion_logprobs_are_parallel_lists_with_offsets(openai_client: OpenAI) -> None:
    resp = openai_client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=2, extra_body={"ignore_eos": True}
    )
    choice = resp.choices[0]
    lp = choice.logprobs
    assert lp is not None and lp.tokens is not None and lp.text_offset is not None
    assert lp.token_logprobs is not None and lp.top_logprobs is not None
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    assert lp.text_offset[0] == 0
    assert all(a <= b for a, b in zip(lp.text_offset, lp.text_offset[1:], strict=False))
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for token_logprob, tops in zip(lp.token_logprobs, lp.top_logprobs, strict=True):
        assert 1 <= len(tops) <= 2
        assert token_logprob == pytest.approx(max(tops.values()), abs=1e-4)  # greedy

    echoed = openai_client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=10,
        temperature=0,
        logprobs=2,
        echo=True,
        extra_body={"ignore_eos": True},
    )
    text = echoed.choices[0].text
    assert text == PROMPT + choice.text
    offsets = echoed.choices[0].logprobs.text_offset  # type: ignore[union-attr]
    assert offsets is not None and offsets[0] == len(PROMPT)
    assert offsets == [len(PROMPT) + o for o in lp.text_offset]


# -- n -------------------------------------------------------------------------------------


def test_n_choices_unary_and_streamed(openai_client: OpenAI) -> None:
    resp = openai_client.chat.completions.create(
        model=MODEL, messages=CHAT, n=3, max_tokens=6, temperature=1, extra_body={"ignore_eos": True}
    )
    assert [c.index for c in resp.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" and c.message.content for c in resp.choices)
    assert resp.usage.completion_tokens == 18  # every choice counted

    stream = openai_client.chat.completions.create(
        model=MODEL,
        messages=CHAT,
        n=3,
        max_tokens=6,
        temperature=1,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    finishes: dict[int, list[str | None]] = defaultdict(list)
    chunks = list(stream)
    for chunk in chunks:
        for c in chunk.choices:
            finishes[c.index].append(c.finish_reason)
    assert sorted(finishes) == [0, 1, 2]
    for reasons in finishes.values():
        assert reasons[-1] == "length" and all(r is None for r in reasons[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 18


def test_n_above_the_tenants_cap_is_refused(cluster: Cluster, admin: httpx.Client) -> None:
    _, key, _ = _new_tenant(admin, limits={"max_n": 2})
    with _client(cluster, key) as client:
        body = {"model": MODEL, "messages": CHAT, "max_tokens": 2, "temperature": 1}
        assert client.post("/v1/chat/completions", json={**body, "n": 2}).status_code == 200
        refused = client.post("/v1/chat/completions", json={**body, "n": 3})
        assert refused.status_code == 400, refused.text
        assert refused.json()["error"]["param"] == "n"


def test_n_is_priced_as_n_completions_at_admission(cluster: Cluster, admin: httpx.Client) -> None:
    # 200 tokens a minute: one choice of 40 tokens (plus a short prompt) fits, eight do not.
    _, key, _ = _new_tenant(admin, limits={"tpm": 200})
    with _client(cluster, key) as client:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 40, "temperature": 1}
        refused = client.post("/v1/completions", json={**body, "n": 8})
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"]["param"] == "request_exceeds_tpm"
        admitted = client.post("/v1/completions", json={**body, "n": 1})
        assert admitted.status_code == 200, admitted.text


# -- stop_token_ids, min_tokens, logit_bias ------------------------------------------------


def test_stop_token_ids_end_the_choice_at_that_token(openai_client: OpenAI) -> None:
    text, tokens = _greedy(openai_client)
    k, token_id = _pick_position(tokens)
    resp = openai_client.completions.create(
        model=MODEL,
        prompt=PROMPT,
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True, "stop_token_ids": [token_id]},
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "stop"
    assert resp.usage.completion_tokens == k + 1  # the stop token is generated, then it ends
    assert text.startswith(choice.text) and len(choice.text) < len(text)


def test_min_tokens_holds_back_the_end_of_sequence(openai_client: OpenAI) -> None:
    # A bias towards <|endoftext|> makes greedy decoding end at once...
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 16, "temperature": 0}
    eager = openai_client.completions.create(**body, logit_bias={str(EOS): 100})
    assert eager.choices[0].finish_reason == "stop"
    assert eager.usage.completion_tokens <= 1
    # ...and min_tokens (ignore_eos off) makes it generate that many first.
    held = openai_client.completions.create(**body, logit_bias={str(EOS): 100}, extra_body={"min_tokens": 6})
    assert held.usage.completion_tokens >= 6
    assert held.choices[0].finish_reason == "stop"  # then the end of sequence, as biased


def test_logit_bias_keeps_a_token_out_and_brings_one_in(openai_client: OpenAI) -> None:
    _, tokens = _greedy(openai_client)
    _, banned = _pick_position(tokens)
    _, without = _greedy(openai_client, logit_bias={str(banned): -100})
    assert _token_text(banned) in tokens
    assert _token_text(banned) not in without

    wanted = next(
        i for i in range(1000, 32000) if _unique_id(_token_text(i)) == i and _token_text(i) not in tokens
    )
    _, forced = _greedy(openai_client, max_tokens=4, logit_bias={str(wanted): 100})
    assert forced == [_token_text(wanted)] * 4


def test_logit_bias_is_validated(http: httpx.Client) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 2}
    for bias, fragment in (({"x": 1}, "token ids"), ({"5": 101}, "[-100, 100]")):
        resp = http.post("/v1/completions", json={**body, "logit_bias": bias})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["param"] == "logit_bias" and fragment in resp.json()["error"]["message"]


# -- echo ----------------------------------------------------------------------------------


def test_echo_prepends_the_prompt_or_the_last_assistant_message(
    openai_client: OpenAI, http: httpx.Client
) -> None:
    plain = openai_client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0)
    echoed = openai_client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0, echo=True
    )
    assert echoed.choices[0].text == PROMPT + plain.choices[0].text

    start = "Sure, here it is:"
    messages = [*CHAT, {"role": "assistant", "content": start}]
    body = {"model": MODEL, "messages": messages, "max_tokens": 5, "temperature": 0, "echo": True}
    chat = http.post("/v1/chat/completions", json=body)
    assert chat.status_code == 200, chat.text
    content = chat.json()["choices"][0]["message"]["content"]
    assert content.startswith(start) and len(content) > len(start)
    events = _sse(http, "/v1/chat/completions", body)
    assert events[0]["choices"][0]["delta"]["content"].startswith(start)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"]) == content
    # The last message is the user's: nothing to echo.
    user_last = http.post("/v1/chat/completions", json={**body, "messages": CHAT})
    assert not user_last.json()["choices"][0]["message"]["content"].startswith(start)


# -- prompts in /v1/completions ------------------------------------------------------------


def test_a_prompt_list_with_n_comes_back_in_openai_order(openai_client: OpenAI) -> None:
    prompts = [PROMPT, "class Stack:"]
    body = {"model": MODEL, "max_tokens": 6, "temperature": 0, "extra_body": {"ignore_eos": True}}
    resp = openai_client.completions.create(prompt=prompts, n=2, **body)  # type: ignore[arg-type]
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    singles = [openai_client.completions.create(prompt=p, **body).choices[0].text for p in prompts]  # type: ignore[arg-type]
    assert singles[0] != singles[1]
    # Prompt i's choices are i*n .. i*n+n-1; greedy, so each equals the single-prompt answer.
    assert [c.text for c in resp.choices] == [singles[0], singles[0], singles[1], singles[1]]
    assert resp.usage.completion_tokens == 4 * 6


def test_token_id_prompts(openai_client: OpenAI, http: httpx.Client) -> None:
    ids = _tokenizer().encode(PROMPT, add_special_tokens=False).ids
    other = _tokenizer().encode("class Stack:", add_special_tokens=False).ids
    body = {"model": MODEL, "max_tokens": 5, "temperature": 0, "extra_body": {"ignore_eos": True}}
    one = openai_client.completions.create(prompt=ids, echo=True, **body)  # type: ignore[arg-type]
    assert one.usage.prompt_tokens == len(ids)
    assert one.choices[0].text.startswith(_tokenizer().decode(ids, skip_special_tokens=False))
    both = openai_client.completions.create(prompt=[ids, other], **body)  # type: ignore[arg-type]
    assert [c.index for c in both.choices] == [0, 1]
    assert both.usage.prompt_tokens == len(ids) + len(other)
    assert both.choices[0].text == openai_client.completions.create(prompt=ids, **body).choices[0].text  # type: ignore[arg-type]

    vocab = _tokenizer().get_vocab_size(with_added_tokens=True)
    for prompt in ([ids[0], vocab + 5], [ids, [vocab]]):
        resp = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
        assert resp.status_code == 400, resp.text
        assert resp.json()["error"]["type"] == "invalid_request_error"


def test_max_completion_tokens_in_completions(openai_client: OpenAI, http: httpx.Client) -> None:
    resp = openai_client.completions.create(
        model=MODEL, prompt=PROMPT, temperature=0, extra_body={"max_completion_tokens": 7, "ignore_eos": True}
    )
    assert resp.usage.completion_tokens == 7 and resp.choices[0].finish_reason == "length"
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "max_completion_tokens": 7}
    for path, payload in (
        ("/v1/completions", body),
        ("/v1/chat/completions", {**{k: v for k, v in body.items() if k != "prompt"}, "messages": CHAT}),
    ):
        disagree = http.post(path, json=payload)
        assert disagree.status_code == 400, disagree.text
        assert disagree.json()["error"]["param"] == "max_completion_tokens"


# -- usage ---------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_continuous_usage_stats_on_every_chunk(http: httpx.Client, path: str) -> None:
    body: dict[str, object] = {"model": MODEL, "max_tokens": 10, "temperature": 0, "ignore_eos": True}
    body.update({"messages": CHAT} if path.endswith("chat/completions") else {"prompt": PROMPT})
    body["stream_options"] = {"continuous_usage_stats": True, "include_usage": True}
    events = _sse(http, path, body)
    assert all("usage" in e and e["usage"] is not None for e in events)
    counts = [e["usage"]["completion_tokens"] for e in events]
    assert counts == sorted(counts) and counts[-1] == 10
    assert all(
        e["usage"]["total_tokens"] == e["usage"]["prompt_tokens"] + e["usage"]["completion_tokens"]
        for e in events
    )
    # Without it, only the last (usage) chunk carries usage.
    body["stream_options"] = {"include_usage": True}
    events = _sse(http, path, body)
    assert [e.get("usage") is not None for e in events] == [False] * (len(events) - 1) + [True]


def test_cached_tokens_in_streamed_chat(http: httpx.Client) -> None:
    # A long system message of its own: whole 128-token blocks of the CPU prefix cache.
    document = "\n".join(f"def helper_{i}(value):\n    return value * {i}" for i in range(48))
    messages = [{"role": "system", "content": f"# {uuid.uuid4().hex}\n{document}"}, *CHAT]
    body = {
        "model": MODEL,
        "messages": messages,
        "max_tokens": 2,
        "stream_options": {"include_usage": True},
    }
    first = _sse(http, "/v1/chat/completions", body)[-1]["usage"]
    assert first["prompt_tokens"] >= 512 and first["prompt_tokens_details"]["cached_tokens"] == 0
    again = _sse(http, "/v1/chat/completions", body)[-1]["usage"]
    assert again["prompt_tokens_details"]["cached_tokens"] >= 512 - 128
