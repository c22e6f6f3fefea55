"""A small tokenizer in the tiny models' format, for gateway tests without the model build.

The tiny models' tokenizer (services/local/tiny_tokenizer.py) is a 32,000-token BPE trained
on the stdlib (seconds, and the cluster layer builds it with the models). This one is a BPE
of a few hundred tokens trained on a paragraph, with the same special tokens at the same ids
and the same chat template, written as the gateway reads a model's files: tokenizer.json,
tokenizer_config.json and chat_template.jinja.
"""

from __future__ import annotations

import json
from pathlib import Path

from services.catalog.models import Catalog
from services.local.tiny_tokenizer import BOS, CHAT_TEMPLATE, EOS, UNK, special_tokens

TRAINING_TEXT = (
    "Once upon a time there was a tiny model that counted tokens. Say hello to the user, "
    "and answer in a word. The quick brown fox jumps over the lazy dog; 0123456789. "
) * 20
BPE_VOCAB = 32_000  # the special tokens' ids follow the BPE's, as in Phi-3


def write_tokenizer_files(model_dir: Path) -> None:
    """The tokenizer files into `model_dir` (a model's folder)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[UNK, BOS, "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TRAINING_TEXT], trainer=trainer)
    # Fill up to the real special ids with unused tokens, so the ids match Phi-3's.
    tok.add_tokens([f"<unused{i}>" for i in range(tok.get_vocab_size(), BPE_VOCAB)])
    specials = special_tokens()
    tok.add_special_tokens([specials[i] for i in sorted(specials)])
    assert all(tok.token_to_id(token) == token_id for token_id, token in specials.items())
    model_dir.mkdir(parents=True, exist_ok=True)
    tok.save(str(model_dir / "tokenizer.json"))
    config = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": EOS}
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    (model_dir / "chat_template.jinja").write_text(CHAT_TEMPLATE)


def write_catalog_tokenizers(catalog: Catalog, model_dir: Path) -> None:
    """The same files for every pool of `catalog`, where the gateway looks for them."""
    for pool in catalog.enabled_pools:
        write_tokenizer_files(Path(pool.resolve_model_path(model_dir)))
