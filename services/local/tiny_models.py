"""Offline builder of tiny, random-weight models in the real Phi-3.5 architectures.

No model hub is reachable in tests/CI, so we build, once per cache folder:

* ``tokenizer/``            a byte-level BPE (32,000 tokens, trained on the Python stdlib)
                            plus Phi-3's special tokens at their real ids (vocab 32,064;
                            see tiny_tokenizer.py);
* ``phi-3.5-mini-tiny/``    ``Phi3ForCausalLM`` with LongRoPE (8.5 M parameters);
* ``phi-3.5-moe-tiny/``     ``PhiMoEForCausalLM``, 4 experts, top-2 (9.2 M parameters);
* ``phi-3.5-vision-tiny/``  ``Phi3VForCausalLM`` with a one-layer CLIP ViT-L/14-336 tower and
                            our own image processor (remote code, see tiny_vision.py).

Each model folder holds config.json (hub legacy layout), generation_config.json,
model.safetensors (bf16) and the tokenizer files. A folder is built in a temp folder next to
the target, marked complete by writing ``.complete`` last, then renamed into place; complete
folders are skipped, so repeated calls are cheap no-ops. Builds are deterministic and offline.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

from .tiny_tokenizer import (  # noqa: F401  (re-exported: services.local.tiny_models's public names)
    BOS,
    BPE_VOCAB_SIZE,
    CHAT_TEMPLATE,
    END_TOKEN_ID,
    EOS,
    IMAGE_TOKEN_ID,
    MAX_POSITIONS,
    UNK,
    VOCAB_SIZE,
    build_tokenizer,
    special_tokens,
)

TINY_MODEL_NAMES = ("phi-3.5-mini-tiny", "phi-3.5-moe-tiny", "phi-3.5-vision-tiny")
TOKENIZER_DIR = "tokenizer"
MARKER = ".complete"
BUILD_VERSION = 1  # bump to make existing caches rebuild

HIDDEN, INTERMEDIATE, LAYERS, HEADS = 128, 256, 2, 4
ORIGINAL_MAX_POSITIONS = 1024


# --------------------------------------------------------------------------- configs


def _longrope(head_dim: int, *, mscale: bool) -> dict[str, object]:
    half = head_dim // 2
    rope: dict[str, object] = {
        "long_factor": [round(1.0 + 7.0 * i / (half - 1), 4) for i in range(half)],
        "short_factor": [round(1.0 + 0.05 * i / (half - 1), 4) for i in range(half)],
        "type": "longrope",
    }
    if mscale:  # PhiMoE's config carries them (transformers 5 requires them)
        scale = MAX_POSITIONS / ORIGINAL_MAX_POSITIONS
        value = math.sqrt(1 + math.log(scale) / math.log(ORIGINAL_MAX_POSITIONS))
        rope.update(
            long_mscale=value,
            short_mscale=value,
            original_max_position_embeddings=ORIGINAL_MAX_POSITIONS,
        )
    return rope


def text_config() -> dict:
    """Phi-3.5-mini-instruct's config.json, shrunk (hub legacy `rope_scaling` layout)."""
    return {
        "architectures": ["Phi3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "embd_pdrop": 0.0,
        "eos_token_id": 32000,
        "hidden_act": "silu",
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "max_position_embeddings": MAX_POSITIONS,
        "model_type": "phi3",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": HEADS,
        "original_max_position_embeddings": ORIGINAL_MAX_POSITIONS,
        "pad_token_id": 32000,
        "resid_pdrop": 0.0,
        "rms_norm_eps": 1e-05,
        "rope_scaling": _longrope(HIDDEN // HEADS, mscale=False),
        "rope_theta": 10000.0,
        "sliding_window": 262144,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
    }


def moe_config() -> dict:
    """Phi-3.5-MoE-instruct's config.json, shrunk."""
    return {
        "architectures": ["PhiMoEForCausalLM"],
        "attention_bias": True,
        "attention_dropout": 0.0,
        "bos_token_id": 1,
        "eos_token_id": 32000,
        "hidden_act": "silu",
        "hidden_dropout": 0.0,
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "input_jitter_noise": 0.01,
        "intermediate_size": INTERMEDIATE,
        "lm_head_bias": True,
        "max_position_embeddings": MAX_POSITIONS,
        "model_type": "phimoe",
        "num_attention_heads": HEADS,
        "num_experts_per_tok": 2,
        "num_hidden_layers": LAYERS,
        "num_key_value_heads": HEADS // 2,
        "num_local_experts": 4,
        "original_max_position_embeddings": ORIGINAL_MAX_POSITIONS,
        "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_scaling": _longrope(HIDDEN // HEADS, mscale=True),
        "rope_theta": 10000.0,
        "router_aux_loss_coef": 0.0,
        "router_jitter_noise": 0.01,
        "sliding_window": 131072,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": VOCAB_SIZE,
    }


GENERATION_CONFIG = {
    "bos_token_id": 1,
    "eos_token_id": [32000, END_TOKEN_ID],
    "pad_token_id": 32000,
}


# --------------------------------------------------------------------------- weights


class WeightFactory:
    """Deterministic random tensors (N(0, 0.02) matrices, unit norms, zero biases)."""

    def __init__(self, seed: int):
        import torch

        self.torch = torch
        self.gen = torch.Generator().manual_seed(seed)
        self.tensors: dict = {}

    def normal(self, name: str, *shape: int, std: float = 0.02) -> None:
        t = self.torch.randn(*shape, generator=self.gen) * std
        self.tensors[name] = t.to(self.torch.bfloat16).contiguous()

    def ones(self, name: str, *shape: int) -> None:
        self.tensors[name] = self.torch.ones(*shape, dtype=self.torch.bfloat16)

    def zeros(self, name: str, *shape: int) -> None:
        self.tensors[name] = self.torch.zeros(*shape, dtype=self.torch.bfloat16)

    def layer_norm(self, prefix: str, dim: int) -> None:
        self.ones(f"{prefix}.weight", dim)
        self.zeros(f"{prefix}.bias", dim)

    def linear(self, prefix: str, out_dim: int, in_dim: int, *, bias: bool) -> None:
        self.normal(f"{prefix}.weight", out_dim, in_dim)
        if bias:
            self.zeros(f"{prefix}.bias", out_dim)

    def save(self, path: Path) -> int:
        from safetensors.torch import save_file

        save_file(self.tensors, str(path), metadata={"format": "pt"})
        return sum(t.numel() for t in self.tensors.values())


def phi3_weights(cfg: dict, w: WeightFactory) -> None:
    """Tensors named as in Phi-3.5-mini-instruct's checkpoint (fused qkv / gate_up)."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = h // cfg["num_attention_heads"]
    qkv = (cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"]) * head_dim
    w.normal("model.embed_tokens.weight", v, h)
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}"
        w.linear(f"{p}.self_attn.qkv_proj", qkv, h, bias=False)
        w.linear(f"{p}.self_attn.o_proj", h, h, bias=False)
        w.linear(f"{p}.mlp.gate_up_proj", 2 * i, h, bias=False)
        w.linear(f"{p}.mlp.down_proj", h, i, bias=False)
        w.ones(f"{p}.input_layernorm.weight", h)
        w.ones(f"{p}.post_attention_layernorm.weight", h)
    w.ones("model.norm.weight", h)
    w.linear("lm_head", v, h, bias=False)


def phimoe_weights(cfg: dict, w: WeightFactory) -> None:
    """Tensors named as in Phi-3.5-MoE-instruct's checkpoint (experts.E.w1/w2/w3)."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    head_dim = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * head_dim
    w.normal("model.embed_tokens.weight", v, h)
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}"
        w.linear(f"{p}.self_attn.q_proj", h, h, bias=True)
        w.linear(f"{p}.self_attn.k_proj", kv, h, bias=True)
        w.linear(f"{p}.self_attn.v_proj", kv, h, bias=True)
        w.linear(f"{p}.self_attn.o_proj", h, h, bias=True)
        w.linear(f"{p}.block_sparse_moe.gate", cfg["num_local_experts"], h, bias=False)
        for e in range(cfg["num_local_experts"]):
            ep = f"{p}.block_sparse_moe.experts.{e}"
            w.linear(f"{ep}.w1", i, h, bias=False)
            w.linear(f"{ep}.w2", h, i, bias=False)
            w.linear(f"{ep}.w3", i, h, bias=False)
        w.layer_norm(f"{p}.input_layernorm", h)
        w.layer_norm(f"{p}.post_attention_layernorm", h)
    w.layer_norm("model.norm", h)
    w.linear("lm_head", v, h, bias=True)


# --------------------------------------------------------------------------- building


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _is_complete(folder: Path) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("version") == BUILD_VERSION


def _build_atomically(target: Path, fill: Callable[[Path], None]) -> None:
    """fill() a temp folder next to target, write the marker last, rename into place."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        fill(tmp)
        _write_json(tmp / MARKER, {"version": BUILD_VERSION, "name": target.name})
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)  # safetensors writes 0600 files
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.{os.getpid()}.old")
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def _locked(cache_dir: Path) -> Iterator[None]:
    with open(cache_dir / ".build.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _remove_stale(cache_dir: Path) -> None:
    """Temp/old folders of builds that died (we hold the lock, so nobody owns them)."""
    for pattern in (".*.tmp", ".*.old"):
        for stale in cache_dir.glob(pattern):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)


def _model_filler(name: str, tokenizer_dir: Path) -> Callable[[Path], None]:
    def fill(dst: Path) -> None:
        from . import tiny_vision

        for f in sorted(tokenizer_dir.iterdir()):
            if f.is_file() and f.name != MARKER:
                shutil.copyfile(f, dst / f.name)
        weights = WeightFactory(seed=zlib.crc32(name.encode()))
        if name == "phi-3.5-mini-tiny":
            cfg = text_config()
            phi3_weights(cfg, weights)
        elif name == "phi-3.5-moe-tiny":
            cfg = moe_config()
            phimoe_weights(cfg, weights)
        elif name == "phi-3.5-vision-tiny":
            cfg = tiny_vision.vision_config(text_config())
            phi3_weights(cfg, weights)
            tiny_vision.vision_weights(cfg, weights)
            tiny_vision.write_processor_files(dst)
        else:
            raise ValueError(f"unknown tiny model {name!r}; known: {TINY_MODEL_NAMES}")
        weights.save(dst / "model.safetensors")
        _write_json(dst / "config.json", cfg)
        _write_json(dst / "generation_config.json", GENERATION_CONFIG)

    return fill


def build_tiny_models(
    cache_dir: Path,
    *,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Build (or reuse) the tiny models under cache_dir; returns {name: model folder}."""
    cache_dir = Path(cache_dir).resolve()
    targets = {name: cache_dir / name for name in TINY_MODEL_NAMES}
    if not force and all(_is_complete(p) for p in targets.values()):
        return targets
    cache_dir.mkdir(parents=True, exist_ok=True)
    with _locked(cache_dir):
        _remove_stale(cache_dir)
        tokenizer_dir = cache_dir / TOKENIZER_DIR
        if force or not _is_complete(tokenizer_dir):
            start = time.monotonic()
            _build_atomically(tokenizer_dir, build_tokenizer)
            log(f"tiny models: trained tokenizer in {time.monotonic() - start:.1f}s")
        for name, target in targets.items():
            if not force and _is_complete(target):
                continue
            start = time.monotonic()
            _build_atomically(target, _model_filler(name, tokenizer_dir))
            log(f"tiny models: built {name} in {time.monotonic() - start:.1f}s -> {target}")
    return targets
