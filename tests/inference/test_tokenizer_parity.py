"""The gateway's tokenizer (the `tokenizers` library on the model's files) encodes a text
prompt as the engine's transformers tokenizer does, special tokens included, and renders a
chat with the same template: /tokenize's ids are the engine's (issue 11, item 4).

The model files are tests/fakes/tokenizer.py's (the tiny models' format), varied as real
models vary: add_bos_token/add_eos_token in tokenizer_config.json, a tokenizer.json whose
post-processor adds <s>.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, processors
from transformers import AutoTokenizer

from services.catalog.models import Modality
from services.inference.chat_template import load_chat_template
from services.inference.tokens import _load_tokenizer
from services.pools.engine import ChatMessage, GenerationRequest, SamplingOptions
from services.pools.prompts import PromptRenderer
from tests.fakes.tokenizer import write_tokenizer_files

TEXT = "Once upon a time, the quick brown fox said hello."
CONVERSATION = (
    ChatMessage(role="developer", text="Answer in a word."),
    ChatMessage(role="user", text="Say hello"),
    ChatMessage(role="assistant", text="hello"),
    ChatMessage(role="tool", text="Result of tool call c1:\nsunny"),
)


def _model(tmp_path: Path, *, bos_in_tokenizer_json: bool = False, **flags: Any) -> Path:
    folder = tmp_path / "model"
    write_tokenizer_files(folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, **flags}))
    if bos_in_tokenizer_json:  # as Llama-style tokenizer.json files add <s>
        tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<s>:0 $A:0", pair="<s>:0 $A:0 <s>:1 $B:1", special_tokens=[("<s>", 1)]
        )
        tokenizer.save(str(folder / "tokenizer.json"))
    return folder


@pytest.mark.parametrize("bos_in_tokenizer_json", [False, True])
@pytest.mark.parametrize(
    "flags", [{}, {"add_bos_token": True}, {"add_bos_token": False, "add_eos_token": True}]
)
def test_a_text_prompt_encodes_as_transformers_encodes_it(
    tmp_path: Path, flags: dict[str, bool], bos_in_tokenizer_json: bool
) -> None:
    """The special tokens added are tokenizer.json's post-processor's: transformers 5 drops
    tokenizer_config.json's add_bos_token/add_eos_token when a tokenizer.json is there."""
    folder = _model(tmp_path, bos_in_tokenizer_json=bos_in_tokenizer_json, **flags)
    gateway = _load_tokenizer(str(folder))
    engine = AutoTokenizer.from_pretrained(str(folder))
    assert gateway.encode(TEXT).ids == engine.encode(TEXT)  # vLLM encodes a text prompt so
    assert gateway.encode(TEXT, add_special_tokens=False).ids == engine.encode(TEXT, add_special_tokens=False)
    assert (gateway.encode(TEXT).ids[0] == 1) is bos_in_tokenizer_json


def test_a_chat_renders_as_the_pools_renderer_renders_it(tmp_path: Path) -> None:
    folder = _model(tmp_path, add_bos_token=True)
    template = load_chat_template(str(folder))
    assert template is not None
    engine = AutoTokenizer.from_pretrained(str(folder))
    request = GenerationRequest(request_id="r", model="m", sampling=SamplingOptions(), messages=CONVERSATION)
    for generation_prompt in (True, False):
        ours = PromptRenderer(template, modality=Modality.text).render(
            request, add_generation_prompt=generation_prompt
        )
        theirs = PromptRenderer(engine, modality=Modality.text).render(
            request, add_generation_prompt=generation_prompt
        )
        assert ours == theirs
    assert ours.startswith("<|system|>\nAnswer in a word.<|end|>\n") and ours.endswith("<|endoftext|>")
    assert _load_tokenizer(str(folder)).encode(ours).ids == engine.encode(ours)


def test_a_model_without_a_template_has_none(tmp_path: Path) -> None:
    folder = _model(tmp_path)
    (folder / "chat_template.jinja").unlink()
    assert load_chat_template(str(folder)) is None
    # An older model keeps it in tokenizer_config.json.
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    template = load_chat_template(str(folder))
    assert template is not None
    text = template.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "[user]hi"
