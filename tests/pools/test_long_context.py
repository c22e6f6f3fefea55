"""Length-aware pools on the real engines (issue 13, item 2).

The local profile backs phi-3.5-mini with `text` (max_model_len 1024, the tiny model's
original_max_position_embeddings) and `text-long` (2048). vLLM picks LongRoPE's factors once,
from max_model_len: the two engines must really run different ones, and a request must land on
the pool its length needs.
"""

from __future__ import annotations

import json
import math

import httpx

from tests.conftest import AUTH, Cluster
from tests.helpers import pool_diagnostics

MODEL = "phi-3.5-mini"
PROMPT = "The quick brown fox jumps over the lazy dog near the river bank"


def _first_token_logprobs(cluster: Cluster, **extra: object) -> tuple[str, float, dict[str, float]]:
    body = {
        "model": MODEL,
        "prompt": PROMPT,
        "temperature": 0,
        "logprobs": 5,
        "stream": True,
        **extra,
    }
    # Streamed, and closed after the first token: a long request need not run to its end.
    with httpx.stream("POST", f"{cluster.base_url}/completions", json=body, headers=AUTH, timeout=60) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            logprobs = json.loads(line.removeprefix("data: "))["choices"][0]["logprobs"]
            if logprobs and logprobs["tokens"]:
                top = logprobs["top_logprobs"][0]
                return logprobs["tokens"][0], logprobs["token_logprobs"][0], top
    raise AssertionError("no token came back")


def test_the_short_and_long_pools_run_different_rope_factors(cluster: Cluster) -> None:
    short, long = pool_diagnostics("text"), pool_diagnostics("text-long")
    # From each engine's own resolved config (vLLM's rule: long factors beyond
    # original_max_position_embeddings); the next test shows the factors change the scores.
    assert short["rope_scaling"]["rope_type"] == long["rope_scaling"]["rope_type"] == "longrope"
    assert short["rope_scaling"]["original_max_position_embeddings"] == short["max_model_len"] == 1024
    assert (short["rope_scaling"]["factors"], long["rope_scaling"]["factors"]) == ("short", "long")
    assert long["max_model_len"] == 2048


def test_the_same_prompt_scores_differently_on_the_two_pools(cluster: Cluster) -> None:
    """Same weights, same prompt, greedy: only the RoPE factors differ between the pools, and
    they change the model's scores. Each pool repeats its own scores exactly."""
    short_a = _first_token_logprobs(cluster, max_tokens=4)
    short_b = _first_token_logprobs(cluster, max_tokens=4)
    long_a = _first_token_logprobs(cluster, max_tokens=1500, ignore_eos=True)  # beyond 1024: text-long
    long_b = _first_token_logprobs(cluster, max_tokens=1500, ignore_eos=True)
    assert short_a == short_b and long_a == long_b
    short_scores, long_scores = short_a[2], long_a[2]
    shared = set(short_scores) & set(long_scores)
    differs = short_a[0] != long_a[0] or any(
        not math.isclose(short_scores[t], long_scores[t], abs_tol=1e-4) for t in shared
    )
    assert differs, (short_a, long_a)


def test_a_request_beyond_the_short_context_gets_its_whole_answer(cluster: Cluster) -> None:
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 1100, "ignore_eos": True, "temperature": 0}
    answer = httpx.post(f"{cluster.base_url}/completions", json=body, headers=AUTH, timeout=120)
    assert answer.status_code == 200, answer.text
    usage = answer.json()["usage"]
    # 1100 tokens cannot fit the short pool's 1024-token context at all: the long pool ran it.
    assert usage["completion_tokens"] == 1100
    assert answer.json()["choices"][0]["finish_reason"] == "length"
    assert answer.json()["model"] == MODEL
