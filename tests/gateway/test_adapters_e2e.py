"""Tenants' LoRA adapters through the real cluster (issue 14): REST chat and completions,
unary and streamed, /tokenize, usage and metrics, from the owner's and the attacker's side.

Adapters are registered through the admin API while the cluster runs (none is known at
start-up), from the tiny adapters in the adapter store (services/local/tiny_adapters.py).
"""

from __future__ import annotations

import concurrent.futures
import json
import re

import httpx
import torch
from safetensors.torch import load_file, save_file

from tests.adapter_helpers import (
    BASE,
    CHAT,
    PROMPT,
    chat_body,
    chat_text,
    client,
    new_tenant,
    owned_copy,
    register,
    usage_by_model,
)
from tests.conftest import Cluster, wait_until


def _refusal(http: httpx.Client, path: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    """Status and error body, with the model name the client sent replaced (the message quotes it)."""
    resp = http.post(path, json=body)
    model = str(body["model"])
    return resp.status_code, json.loads(resp.text.replace(model, "<model>"))


def test_two_tenants_adapters_on_one_base_answer_apart(cluster: Cluster, admin: httpx.Client) -> None:
    a_id, a_key = new_tenant(admin)
    b_id, b_key = new_tenant(admin)
    # The same adapter name in both tenants: two different adapters, two different ids.
    a_model = register(admin, a_id, "support", "tiny/phi-3.5-mini-1")
    b_model = register(admin, b_id, "support", "tiny/phi-3.5-mini-2")
    with client(cluster, a_key) as a, client(cluster, b_key) as b:
        a_text = chat_text(a, a_model)
        b_text = chat_text(b, b_model)
        base_text = chat_text(a, BASE)
        assert chat_text(a, a_model) == a_text and chat_text(b, b_model) == b_text  # repeatable
        assert len({a_text, b_text, base_text}) == 3, (a_text, b_text, base_text)
        assert chat_text(b, BASE) == base_text  # the base is the same model for everyone
        # Usage rows under the adapter's model id: each tenant's usage splits per adapter.
        assert usage_by_model(a) == {a_model: 2, BASE: 1}
        assert usage_by_model(b) == {b_model: 2, BASE: 1}


def test_another_tenants_adapter_is_the_same_404_as_a_made_up_model(
    cluster: Cluster, admin: httpx.Client
) -> None:
    a_id, a_key = new_tenant(admin)
    b_id, b_key = new_tenant(admin)
    a_model = register(admin, a_id, "secret", "tiny/phi-3.5-mini-3")
    with client(cluster, a_key) as a, client(cluster, b_key) as b:
        chat_text(a, a_model)  # A's adapter exists and is loaded on the pool
        made_up = f"ft:{BASE}:{a_id}:no-such-adapter"
        for path, body in [
            (CHAT, chat_body(a_model)),
            (CHAT, chat_body(a_model, stream=True)),
            ("/v1/completions", {"model": a_model, "prompt": PROMPT, "max_tokens": 4}),
            ("/v1/completions", {"model": a_model, "prompt": PROMPT, "max_tokens": 4, "stream": True}),
            ("/tokenize", {"model": a_model, "prompt": PROMPT}),
            ("/detokenize", {"model": a_model, "tokens": [1, 2]}),
        ]:
            stolen = _refusal(b, path, body)
            assert stolen[0] == 404, (path, stolen)
            assert stolen == _refusal(b, path, {**body, "model": made_up}), path
            assert stolen == _refusal(b, path, {**body, "model": "no-such-model"}), path
        # B's own id pattern with A's adapter name is not A's adapter either.
        assert _refusal(b, CHAT, chat_body(f"ft:{BASE}:{b_id}:secret"))[0] == 404
        assert not any(model.startswith("ft:") for model in usage_by_model(b))


def test_an_adapter_registered_while_running_is_served_at_once(cluster: Cluster, admin: httpx.Client) -> None:
    tenant_id, key = new_tenant(admin)
    model = f"ft:{BASE}:{tenant_id}:late"
    with client(cluster, key) as http:
        assert http.post(CHAT, json=chat_body(model)).status_code == 404
        assert register(admin, tenant_id, "late", "tiny/phi-3.5-mini-4") == model
        assert chat_text(http, model) != chat_text(http, BASE)


def test_six_adapters_in_use_at_once_all_succeed(cluster: Cluster, admin: httpx.Client) -> None:
    """Six adapters, above the pool's max_loras (2 per step) and max_cpu_loras (4 kept), in
    concurrent requests, twice over: every request succeeds (loads, LRU evictions, reloads)."""
    tenant_id, key = new_tenant(admin)
    models = [register(admin, tenant_id, f"a{i}", f"tiny/phi-3.5-mini-{i}") for i in range(3, 9)]
    with client(cluster, key) as http, concurrent.futures.ThreadPoolExecutor(len(models)) as pool:
        rounds = [list(pool.map(lambda m: chat_text(http, m), models)) for _ in range(2)]
        alone = [chat_text(http, m) for m in models]
        assert usage_by_model(http) == dict.fromkeys(models, 3)
    assert rounds[0] == rounds[1] == alone
    assert len(set(alone)) == len(models), alone  # each request ran with its own adapter


def test_streaming_with_an_adapter(cluster: Cluster, admin: httpx.Client) -> None:
    tenant_id, key = new_tenant(admin)
    model = register(admin, tenant_id, "streamer", "tiny/phi-3.5-mini-5")
    with client(cluster, key) as http:
        whole = chat_text(http, model)
        pieces: list[str] = []
        body = chat_body(model, stream=True, stream_options={"include_usage": True})
        with http.stream("POST", CHAT, json=body) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: ") :])
                assert chunk["model"] == model
                pieces.extend(c["delta"].get("content") or "" for c in chunk["choices"])
        assert "".join(pieces) == whole
        completion = http.post(
            "/v1/completions",
            json={"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stream": True},
        )
        assert completion.status_code == 200 and f'"model":"{model}"' in completion.text.replace(" ", "")
        # /tokenize counts with the base model's tokenizer: an adapter changes no vocabulary.
        counted = [http.post("/tokenize", json={"model": m, "prompt": PROMPT}).json() for m in (model, BASE)]
        assert counted[0]["tokens"] == counted[1]["tokens"] and counted[0]["count"] > 3
        wait_until(
            lambda: usage_by_model(http).get(model) == 3, timeout_s=10, interval_s=0.2, what="stream settled"
        )


def test_an_adapter_broken_after_registration_is_a_400_and_the_pool_serves_on(
    cluster: Cluster, admin: httpx.Client
) -> None:
    tenant_id, key = new_tenant(admin)
    good = register(admin, tenant_id, "good", "tiny/phi-3.5-mini-6")
    with owned_copy("phi-3.5-mini-7") as (source, folder), client(cluster, key) as http:
        broken = register(admin, tenant_id, "broken", source)  # valid when registered
        good_text, base_text = chat_text(http, good), chat_text(http, BASE)
        weights = folder / "adapter_model.safetensors"
        tensors = load_file(weights)
        tensors = {name: torch.full_like(t, float("nan")) for name, t in tensors.items()}
        save_file(tensors, weights)  # NaNs poisoned the engine when they reached it (measured)
        for _ in range(2):
            refused = http.post(CHAT, json=chat_body(broken))
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"]["code"] == "invalid_adapter"
        # The pool serves on, unpoisoned: the same greedy answers as before.
        assert chat_text(http, good) == good_text
        assert chat_text(http, BASE) == base_text
        assert usage_by_model(http).get(broken) is None  # nothing billed for the refusals


def test_requests_per_adapter_metric_labels_only_labelled_tenants(
    cluster: Cluster, admin: httpx.Client
) -> None:
    labelled_id, labelled_key = new_tenant(admin, metrics_label=True)
    plain_id, plain_key = new_tenant(admin)
    labelled = register(admin, labelled_id, "shown", "tiny/phi-3.5-mini-8")
    plain = register(admin, plain_id, "hidden", "tiny/phi-3.5-mini-8")
    with client(cluster, labelled_key) as a, client(cluster, plain_key) as b:
        chat_text(a, labelled)
        chat_text(b, plain)

    def series() -> list[str]:
        text = httpx.get(f"http://127.0.0.1:{cluster.metrics_port}/metrics", timeout=10).text
        return [line for line in text.splitlines() if line.startswith("ray_phiserve_adapter_requests_total{")]

    def labels(line: str) -> dict[str, str]:
        return dict(re.findall(r'(\w+)="([^"]*)"', line))

    found = wait_until(
        lambda: [labels(s) for s in series() if labels(s).get("tenant") == labelled_id] or None,
        timeout_s=30,
        interval_s=1.0,
        what="the labelled tenant's adapter series",
    )
    assert {(s["model"], s["adapter"]) for s in found} == {(BASE, "shown")}
    everyone = [labels(s) for s in series()]
    assert not any(s["adapter"] == "hidden" or s["tenant"] == plain_id for s in everyone)
    assert any(s["tenant"] == "other" and s["adapter"] == "other" for s in everyone)


def _first_token(http: httpx.Client, model: str, max_tokens: int) -> tuple[str, dict[str, float]]:
    """The first generated token and its top logprobs, streamed and closed after it (a long
    request need not run to its end)."""
    body = {"model": model, "prompt": PROMPT, "temperature": 0, "logprobs": 5, "stream": True}
    with http.stream("POST", "/v1/completions", json={**body, "max_tokens": max_tokens}) as resp:
        assert resp.status_code == 200, resp.read()
        for line in resp.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line.removeprefix("data: "))
            assert chunk["model"] == model
            logprobs = chunk["choices"][0]["logprobs"]
            if logprobs and logprobs["tokens"]:
                return logprobs["tokens"][0], logprobs["top_logprobs"][0]
    raise AssertionError("no token came back")


def test_an_adapter_runs_on_the_long_context_pool_too(cluster: Cluster, admin: httpx.Client) -> None:
    """prompt + max_tokens beyond the short pool's 1024 tokens: text-long runs it, with the
    adapter (text-long has the same LoRA settings)."""
    tenant_id, key = new_tenant(admin)
    model = register(admin, tenant_id, "long", "tiny/phi-3.5-mini-1")
    with client(cluster, key) as http:
        adapter_long = _first_token(http, model, max_tokens=1500)
        assert _first_token(http, model, max_tokens=1500) == adapter_long  # repeatable
        assert adapter_long != _first_token(http, BASE, max_tokens=1500)  # the adapter ran
        assert adapter_long != _first_token(http, model, max_tokens=4)  # on the other pool
        wait_until(
            lambda: usage_by_model(http).get(model) == 3, timeout_s=10, interval_s=0.2, what="streams settled"
        )


def test_another_tenants_adapter_never_runs_on_my_base_requests(
    cluster: Cluster, admin: httpx.Client
) -> None:
    """From the victim's side: base-model requests that share engine steps with another
    tenant's adapter requests get the base model's answer. vLLM 0.32's CPU LoRA kernels index
    the adapter slots with -1 for "no adapter", which selects the LAST slot: a base request
    batched with adapter requests ran with whichever adapter sat in that slot (measured)."""
    _, victim_key = new_tenant(admin)
    owner_id, owner_key = new_tenant(admin)
    adapters = [register(admin, owner_id, f"noisy{i}", f"tiny/phi-3.5-mini-{i}") for i in (1, 2)]
    prompts = [f"{PROMPT} ({i})" for i in range(3)]
    with client(cluster, victim_key) as victim, client(cluster, owner_key) as owner:
        alone = [chat_text(victim, BASE, prompt=p) for p in prompts]
        owned = [chat_text(owner, m, prompt=p) for m in adapters for p in prompts]
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            for _ in range(2):
                noisy = [pool.submit(chat_text, owner, m, prompt=p) for m in adapters for p in prompts]
                mine = [pool.submit(chat_text, victim, BASE, prompt=p) for p in prompts]
                assert [f.result() for f in mine] == alone
                assert [f.result() for f in noisy] == owned
