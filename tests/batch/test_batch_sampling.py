"""The sampling surface through the Batch API (issue 11, items 3 and 4): n, logprobs, a
prompt list and cached_tokens in a batch's output lines, on the real cluster."""

from __future__ import annotations

import io
import json
import uuid

from openai import OpenAI

from tests.batch.test_batch_e2e import assert_exactly_once, wait_final

MODEL = "phi-3.5-mini"


def _long_prompt() -> str:
    # A fresh first line, so only this test's own request can have cached it; long enough
    # for several 128-token blocks of the CPU engine's prefix cache.
    body = "\n".join(f"def helper_{i}(value):\n    return value * {i} + len(str(value))" for i in range(48))
    return f"# batch document {uuid.uuid4().hex}\n{body}\n"


def test_n_logprobs_prompt_lists_and_cached_tokens_in_a_batch(openai_client: OpenAI) -> None:
    long_prompt = _long_prompt()
    # The tenant's own earlier request puts the prompt in the cache the batch line hits.
    primed = openai_client.completions.create(model=MODEL, prompt=long_prompt, max_tokens=1)
    assert primed.usage is not None and primed.usage.prompt_tokens >= 512
    common = {"model": MODEL, "max_tokens": 4, "ignore_eos": True}
    bodies = {
        "n": {**common, "prompt": "def f(x):", "n": 2, "temperature": 1},
        "logprobs": {**common, "prompt": "def f(x):", "logprobs": 2, "temperature": 0},
        "prompts": {**common, "prompt": ["def f(x):", "class A:"], "temperature": 0},
        "cached": {**common, "prompt": long_prompt, "max_tokens": 1},
    }
    lines = [
        json.dumps({"custom_id": f"req-{i}", "method": "POST", "url": "/v1/completions", "body": body})
        for i, body in enumerate(bodies.values())
    ]
    upload = openai_client.files.create(
        file=("in.jsonl", io.BytesIO("\n".join(lines).encode())), purpose="batch"
    )
    batch = openai_client.batches.create(
        input_file_id=upload.id, endpoint="/v1/completions", completion_window="24h"
    )
    done = wait_final(openai_client, batch.id)
    ok, bad = assert_exactly_once(openai_client, done, len(bodies))
    assert not bad, bad
    out = {line["custom_id"]: line["response"]["body"] for line in ok}
    n, logprobs, prompts, cached = (out[f"req-{i}"] for i in range(4))

    assert [c["index"] for c in n["choices"]] == [0, 1]
    assert n["usage"]["completion_tokens"] == 8  # both choices counted

    lp = logprobs["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["text_offset"]) == 4
    assert all(1 <= len(top) <= 2 for top in lp["top_logprobs"])

    assert [c["index"] for c in prompts["choices"]] == [0, 1]
    assert prompts["choices"][0]["text"] == logprobs["choices"][0]["text"]  # greedy, same prompt
    assert prompts["usage"]["completion_tokens"] == 8

    assert cached["usage"]["prompt_tokens_details"]["cached_tokens"] >= 512 - 128
