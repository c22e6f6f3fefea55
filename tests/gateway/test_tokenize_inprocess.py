"""POST /tokenize and /detokenize on the in-process gateway (real core, app and Redis, fake
engines, no Ray), with a small tokenizer in the tiny models' format (tests/fakes/tokenizer.py).

What the pool would count is checked against the pool's own path: its `PromptRenderer` over a
transformers tokenizer (what vLLM's `get_tokenizer` gives it) and that tokenizer's encoding
of the rendered text. The same against the real engine's `usage.prompt_tokens` is in
tests/gateway/test_endpoints.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from transformers import PreTrainedTokenizerFast

from services.catalog.loader import load_catalog
from services.inference.protocol.chat import ChatCompletionRequest
from services.local.redis_server import LocalRedis
from services.pools.prompts import PromptRenderer
from services.tenancy.models import Tenant, TenantLimits
from tests.conftest import inprocess_redis_url
from tests.fakes.gateway import InProcessGateway, run_inprocess_gateway
from tests.fakes.tokenizer import write_catalog_tokenizers

MODEL = "phi-3.5-mini"
CHAT = [
    {"role": "system", "content": "Answer in a word."},
    {"role": "user", "content": "Say hello"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": [{"type": "text", "text": "Once upon a time"}]},
]
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


@pytest.fixture
async def gw(redis_server: LocalRedis, tmp_path: Path) -> AsyncIterator[InProcessGateway]:
    cache = tmp_path / "cache"
    write_catalog_tokenizers(load_catalog("local"), cache / "models")
    async with run_inprocess_gateway(inprocess_redis_url(redis_server), tmp_path, cache_dir=cache) as gateway:
        yield gateway


def _pool_tokenizer(gw: InProcessGateway, model: str = MODEL) -> PreTrainedTokenizerFast:
    """The tokenizer the pool's engine would load from the model's folder."""
    pool = gw.core.router.resolve(model)
    folder = Path(pool.resolve_model_path(gw.settings.model_dir))
    return PreTrainedTokenizerFast(
        tokenizer_file=str(folder / "tokenizer.json"),
        chat_template=(folder / "chat_template.jinja").read_text(),
        eos_token="<|endoftext|>",
    )


async def _post(gw: InProcessGateway, path: str, body: dict[str, Any], **headers: str) -> Any:
    return await gw.client.post(path, json=body, headers={**gw.auth, **headers})


async def test_a_prompt_is_tokenized_as_the_engine_encodes_it_and_detokenizes_back(
    gw: InProcessGateway,
) -> None:
    text = "Once upon a time, the quick brown fox"
    answer = await _post(gw, "/tokenize", {"model": MODEL, "prompt": text, "return_token_strs": True})
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["tokens"] == _pool_tokenizer(gw).encode(text)  # a text prompt, as vLLM encodes it
    assert body["count"] == len(body["tokens"]) > 3
    assert body["max_model_len"] == gw.core.router.resolve(MODEL).context_len == 2048  # its long pool's
    assert body["token_strs"] == _pool_tokenizer(gw).convert_ids_to_tokens(body["tokens"])
    back = await _post(gw, "/detokenize", {"model": MODEL, "tokens": body["tokens"]})
    assert back.status_code == 200, back.text
    assert back.json() == {"prompt": text}


async def test_messages_are_rendered_with_the_models_template_as_the_pool_renders_them(
    gw: InProcessGateway,
) -> None:
    answer = await _post(gw, "/tokenize", {"model": "microsoft/Phi-3.5-mini-instruct", "messages": CHAT})
    assert answer.status_code == 200, answer.text
    # The pool's path: the chat service's request, its PromptRenderer over the tokenizer
    # vLLM loads, and that tokenizer's encoding of the text prompt.
    body = await _chat_body(gw, CHAT)
    _, request, _ = await gw.core.chat.prepare(body, "r")
    hf = _pool_tokenizer(gw)
    rendered = PromptRenderer(hf, modality=gw.core.router.resolve(MODEL).modality).render(request)
    assert rendered.startswith("<|system|>\nAnswer in a word.<|end|>\n<|user|>\n")
    assert rendered.endswith("<|user|>\nOnce upon a time<|end|>\n<|assistant|>\n")
    assert answer.json()["tokens"] == hf.encode(rendered)
    assert answer.json()["count"] == len(hf.encode(rendered))
    # Without the generation prompt: the template's end-of-text instead of <|assistant|>.
    ended = await _post(gw, "/tokenize", {"model": MODEL, "messages": CHAT, "add_generation_prompt": False})
    assert ended.json()["tokens"] == hf.encode(
        PromptRenderer(hf, modality=gw.core.router.resolve(MODEL).modality).render(
            request, add_generation_prompt=False
        )
    )
    assert ended.json()["tokens"][-1] == hf.convert_tokens_to_ids("<|endoftext|>")


async def test_tools_and_tool_history_are_counted_as_a_chat_completion_sends_them(
    gw: InProcessGateway,
) -> None:
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    plain = await _post(gw, "/tokenize", {"model": MODEL, "messages": history})
    forced = {"type": "function", "function": {"name": "get_weather"}}
    with_tools = await _post(
        gw, "/tokenize", {"model": MODEL, "messages": history, "tools": [TOOL], "tool_choice": forced}
    )
    assert plain.status_code == with_tools.status_code == 200, (plain.text, with_tools.text)
    body = await _chat_body(gw, history, tools=[TOOL], tool_choice=forced)
    _, request, _ = await gw.core.chat.prepare(body, "r")
    hf = _pool_tokenizer(gw)
    rendered = PromptRenderer(hf, modality=gw.core.router.resolve(MODEL).modality).render(request)
    assert "Result of tool call c1:\nsunny" in rendered
    assert with_tools.json()["tokens"] == hf.encode(rendered)
    assert with_tools.json()["count"] > plain.json()["count"]
    # As chat: "auto" is refused with its reason.
    auto = await _post(
        gw, "/tokenize", {"model": MODEL, "messages": history, "tools": [TOOL], "tool_choice": "auto"}
    )
    assert auto.status_code == 400 and auto.json()["error"]["param"] == "tool_choice", auto.text


async def test_the_v1_paths_answer_the_same(gw: InProcessGateway) -> None:
    body = {"model": MODEL, "prompt": "hello there"}
    assert (await _post(gw, "/v1/tokenize", body)).json() == (await _post(gw, "/tokenize", body)).json()
    ids = {"model": MODEL, "tokens": [32010, 32001]}
    assert (await _post(gw, "/v1/detokenize", ids)).json() == {"prompt": "<|user|><|assistant|>"}


BAD_INPUT: list[tuple[str, dict[str, Any], str]] = [
    ("/tokenize", {"model": MODEL, "prompt": ""}, "prompt"),
    ("/tokenize", {"model": MODEL}, "prompt"),
    ("/tokenize", {"model": MODEL, "prompt": "a", "messages": CHAT}, "prompt"),
    ("/tokenize", {"model": MODEL, "messages": []}, "messages"),
    ("/tokenize", {"model": MODEL, "prompt": "a", "tools": [TOOL]}, "tools"),
    ("/tokenize", {"model": MODEL, "prompt": "a", "chat_template": "{{ 7 * 7 }}"}, "chat_template"),
    ("/tokenize", {"model": MODEL, "prompt": "a", "add_special_tokens": "yes"}, "add_special_tokens"),
    (
        "/tokenize",
        {"model": MODEL, "messages": [{"role": "user", "content": None, "tool_call_id": "x"}]},
        "messages[0].tool_call_id",
    ),
    ("/detokenize", {"model": MODEL, "tokens": []}, "tokens"),
    ("/detokenize", {"model": MODEL, "tokens": [5, 32064]}, "tokens"),
    ("/detokenize", {"model": MODEL, "tokens": [-1]}, "tokens"),
    ("/detokenize", {"model": MODEL, "tokens": ["5"]}, "tokens[0]"),
]


async def test_bad_input_is_a_400_naming_the_field(gw: InProcessGateway) -> None:
    for path, body, param in BAD_INPUT:
        answer = await _post(gw, path, body)
        assert answer.status_code == 400, (body, answer.text)
        assert answer.json()["error"]["type"] == "invalid_request_error"
        assert answer.json()["error"]["param"] == param, (body, answer.text)


async def test_an_image_is_refused_naming_its_part(gw: InProcessGateway) -> None:
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "what is it?"}, image]}]
    answer = await _post(gw, "/tokenize", {"model": "phi-3.5-vision", "messages": messages})
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "messages[0].content[1]"


async def test_tenant_scope_key_model_and_rate(gw: InProcessGateway) -> None:
    body = {"model": MODEL, "prompt": "hello"}
    # No key: 401 from the middleware, before the body is read.
    assert (await gw.client.post("/tokenize", json=body)).status_code == 401
    assert (await gw.client.post("/detokenize", json={"model": MODEL, "tokens": [1]})).status_code == 401
    # An unknown model: 404, a model the tenant may not use: 403, as a chat completion.
    unknown = await _post(gw, "/tokenize", {**body, "model": "gpt-4"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    key = await gw.add_tenant(
        Tenant(id="narrow", allowed_models=["phi-3.5-vision"], limits=TenantLimits(rpm=3))
    )
    narrow = {"Authorization": f"Bearer {key}"}
    for path, payload in (
        ("/tokenize", body),
        ("/tokenize", {"model": MODEL, "messages": CHAT}),
        ("/detokenize", {"model": MODEL, "tokens": [1]}),
    ):
        refused = await gw.client.post(path, json=payload, headers=narrow)
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["code"] == "model_not_allowed"
    # Each call counts against the tenant's RPM (3): the fourth is 429.
    limited = await gw.client.post("/tokenize", json={**body, "model": "phi-3.5-vision"}, headers=narrow)
    assert limited.status_code == 429, limited.text
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"


async def test_a_body_over_the_json_limit_is_413(gw: InProcessGateway) -> None:
    huge = "x" * (gw.settings.max_json_body_bytes + 1)
    answer = await _post(gw, "/tokenize", {"model": MODEL, "prompt": huge})
    assert answer.status_code == 413, answer.text


async def test_a_long_prompt_is_counted(gw: InProcessGateway) -> None:
    """Long enough to be encoded off the event loop (TokenCounter's threshold)."""
    text = "the quick brown fox " * 2000
    answer = await _post(gw, "/tokenize", {"model": MODEL, "prompt": text})
    assert answer.status_code == 200, answer.text
    assert answer.json()["tokens"] == _pool_tokenizer(gw).encode(text)


async def _chat_body(gw: InProcessGateway, messages: list[dict[str, Any]], **extra: Any) -> Any:
    return ChatCompletionRequest.model_validate_json(
        json.dumps({"model": MODEL, "messages": messages, **extra})
    )
