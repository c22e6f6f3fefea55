"""Prompt rendering on the real tiny tokenizer and its Phi-3 chat template (no cluster)."""

from __future__ import annotations

from pathlib import Path

from services.catalog.models import Modality
from services.pools.engine import ChatMessage, GenerationRequest, SamplingOptions
from services.pools.prompts import PromptRenderer


def _render(model_dir: Path, *messages: ChatMessage) -> str:
    from transformers import AutoTokenizer

    renderer = PromptRenderer(AutoTokenizer.from_pretrained(str(model_dir)), modality=Modality.text)
    return renderer.render(
        GenerationRequest(request_id="r", model="phi-3.5-mini", sampling=SamplingOptions(), messages=messages)
    )


def test_developer_message_reaches_the_prompt_as_system(tiny_models: dict[str, Path]) -> None:
    # OpenAI's `developer` role is the newer name for `system`; Phi's template knows only
    # system/user/assistant and silently dropped anything else (issue 9, item 9).
    model = tiny_models["phi-3.5-mini-tiny"]
    developer = _render(model, ChatMessage("developer", "Answer in French."), ChatMessage("user", "hi"))
    system = _render(model, ChatMessage("system", "Answer in French."), ChatMessage("user", "hi"))
    assert "Answer in French." in developer
    assert developer == system == "<|system|>\nAnswer in French.<|end|>\n<|user|>\nhi<|end|>\n<|assistant|>\n"
