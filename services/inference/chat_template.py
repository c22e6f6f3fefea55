"""A model's own chat template, rendered at the gateway with jinja2 (no transformers).

The pool renders a chat with `tokenizer.apply_chat_template` (services/pools/prompts.py);
/tokenize must produce the same text, so the template is read from the model's files as
transformers reads it (`chat_template.jinja`, else `chat_template` in
`tokenizer_config.json`) and rendered in the environment transformers builds for it
(transformers/utils/chat_template_utils.py: a sandbox with trim_blocks, lstrip_blocks,
loopcontrols, its `tojson`, `raise_exception` and `strftime_now`), with the tokenizer's
special tokens as variables. Importing transformers would cost the gateway seconds and
hundreds of MB for one function.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.catalog.models import PoolConfig

logger = logging.getLogger(__name__)

TEMPLATE_FILE = "chat_template.jinja"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


class ChatTemplate:
    """Duck-types the one tokenizer method `PromptRenderer` calls."""

    def __init__(self, source: str, special_tokens: dict[str, str]) -> None:
        self._template = _environment().from_string(source)
        self._special_tokens = special_tokens

    def apply_chat_template(
        self, conversation: list[dict[str, str]], *, tokenize: bool, add_generation_prompt: bool
    ) -> str:
        assert not tokenize, "the gateway tokenizes with the tokenizers library"
        return self._template.render(
            messages=conversation, add_generation_prompt=add_generation_prompt, **self._special_tokens
        )


class ChatTemplates:
    """Each pool's chat template (None where the model's files have none)."""

    def __init__(self, templates: dict[str, ChatTemplate | None]) -> None:
        self._templates = templates

    @classmethod
    def for_pools(cls, pools: list[PoolConfig], model_dir: Path) -> ChatTemplates:
        return cls({pool.name: load_chat_template(pool.resolve_model_path(model_dir)) for pool in pools})

    def get(self, pool: PoolConfig) -> ChatTemplate | None:
        return self._templates.get(pool.name)


def load_chat_template(model: str) -> ChatTemplate | None:
    """From a local model directory, or the Hugging Face cache/hub for a repo id."""
    try:
        config = json.loads(_model_file(model, CONFIG_FILE).read_text())
        try:
            source: Any = _model_file(model, TEMPLATE_FILE).read_text()
        except Exception:  # noqa: BLE001 - older models keep the template in tokenizer_config.json
            source = config.get("chat_template")
        if isinstance(source, list):  # named templates: the default one is the chat's
            source = next((t["template"] for t in source if t.get("name") == "default"), None)
        if isinstance(source, str):
            return ChatTemplate(source, _special_tokens(config))
        reason = "its files have no chat template"
    except Exception as exc:  # noqa: BLE001 - /tokenize of messages answers 503 for this model
        reason = str(exc)
    logger.warning("no chat template for %s at the gateway (%s); /tokenize takes prompts only", model, reason)
    return None


def _model_file(model: str, name: str) -> Path:
    path = Path(model) / name
    if path.is_file():
        return path
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(model, name))


def _special_tokens(config: dict[str, Any]) -> dict[str, str]:
    tokens = {}
    for name in SPECIAL_TOKENS:
        value = config.get(name)
        if isinstance(value, dict):  # an AddedToken's fields
            value = value.get("content")
        if isinstance(value, str):
            tokens[name] = value
    return tokens


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' override: jinja's own tojson escapes HTML characters.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env
