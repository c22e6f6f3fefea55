"""The tiny models' tokenizer (see tiny.py): a byte-level BPE with 32,000 tokens, trained
offline and deterministically on the Python stdlib's sources, plus Phi-3's special tokens at
their real ids (vocab 32,064) and the Phi-3 chat template.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

BPE_VOCAB_SIZE = 32_000
VOCAB_SIZE = 32_064
BOS, EOS, UNK = "<s>", "<|endoftext|>", "<unk>"
END_TOKEN_ID = 32_007
IMAGE_TOKEN_ID = 32_044
# Phi-3 / Phi-3.5-vision special tokens at their real ids; the other ids in
# 32000..32063 are filled with <|placeholderN|> tokens (numbered like Phi-3's).
_NAMED_SPECIAL = {
    32000: EOS,
    32001: "<|assistant|>",
    32006: "<|system|>",
    32007: "<|end|>",
    32010: "<|user|>",
    IMAGE_TOKEN_ID: "<|image|>",
}

# Phi-3 chat format. Message content may be a string or a list of OpenAI-style parts:
# text parts are joined with "\n", other parts (images) are ignored: callers put the
# `<|image_N|>\n` tags into the text themselves.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set text = message['content'] -%}"
    "{%- elif message['content'] is none -%}{%- set text = '' -%}"
    "{%- else -%}{%- set text = message['content'] | selectattr('type', 'equalto', 'text')"
    " | map(attribute='text') | join('\n') -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}"
    "{%- if text -%}{{ '<|system|>\n' + text + '<|end|>\n' }}{%- endif -%}"
    "{%- elif message['role'] in ['user', 'assistant'] -%}"
    "{{ '<|' + message['role'] + '|>\n' + text + '<|end|>\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\n' }}{%- else -%}{{ eos_token }}{%- endif -%}"
)

# The context length: the tokenizer's model_max_length and the models' max_position_embeddings.
MAX_POSITIONS = 8192


def special_tokens() -> dict[int, str]:
    """id -> token for ids 32000..32063."""
    out, placeholder = {}, 0
    for token_id in range(BPE_VOCAB_SIZE, VOCAB_SIZE):
        if token_id in _NAMED_SPECIAL:
            out[token_id] = _NAMED_SPECIAL[token_id]
        else:
            placeholder += 1
            out[token_id] = f"<|placeholder{placeholder}|>"
    return out


# --------------------------------------------------------------------------- tokenizer


def _training_files() -> list[Path]:
    """The stdlib's own sources (~11 MB on 3.11), in a fixed order."""
    stdlib = Path(os.__file__).parent
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib"}
    return [f for f in sorted(stdlib.rglob("*.py")) if not skip.intersection(f.parts)]


def _training_text() -> Iterator[str]:
    for f in _training_files():
        text = f.read_text(encoding="utf-8", errors="replace")
        for start in range(0, len(text), 4096):
            yield text[start : start + 4096]


def build_tokenizer(dst: Path) -> None:
    """Train the byte-level BPE and save it as a transformers fast tokenizer into dst."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        min_frequency=2,
        special_tokens=[UNK, BOS, "</s>"],  # ids 0, 1, 2 as in Phi-3
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_text(), trainer=trainer)
    if tok.get_vocab_size() != BPE_VOCAB_SIZE:
        raise RuntimeError(f"BPE trained {tok.get_vocab_size()} tokens, need {BPE_VOCAB_SIZE}")
    specials = special_tokens()
    tok.add_special_tokens([specials[i] for i in sorted(specials)])
    for token_id, token in specials.items():
        if tok.token_to_id(token) != token_id:
            raise RuntimeError(f"{token} got id {tok.token_to_id(token)}, expected {token_id}")

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=EOS,
        model_max_length=MAX_POSITIONS,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        chat_template=CHAT_TEMPLATE,
    )
    fast.save_pretrained(str(dst))
