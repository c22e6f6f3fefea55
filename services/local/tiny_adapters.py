"""Offline builder of tiny LoRA adapters for the tiny Phi models (issue 14, item 4).

Tenants' fine-tunes run as LoRA adapters on the shared pools; with no hub, tests and the
local profile need adapters too. This builds PEFT folders (``adapter_config.json`` plus
``adapter_model.safetensors``, bf16) into the adapter store under ``tiny/``:

* ``tiny/phi-3.5-mini-1`` .. ``tiny/phi-3.5-mini-8``: rank 8 on all four Phi-3 modules
  (``qkv_proj``, ``o_proj``, ``gate_up_proj``, ``down_proj``), each from its own seed.

Shapes come from the base model's config.json. The factors are N(0, 0.5): the tiny models'
weights are N(0, 0.02), so each adapter's delta (alpha/r * B @ A) outweighs the base and the
greedy text of every adapter differs from the base's and from each other's on ordinary
prompts (tests/pools/test_adapters_engine.py checks it on the engine). PEFT initialises
lora_B to zero, which would make an adapter a no-op: these are not trained adapters, they
are stand-ins whose only job is to change the output measurably.

None for phi-3.5-vision-tiny: vLLM 0.32's Phi3VForCausalLM does not implement LoRA (its
engine refuses to start with enable_lora: "Phi3VForCausalLM does not support LoRA yet.").

Builds are atomic and skipped when complete, as in tiny_models.py (same lock, marker and
temp-folder-then-rename), deterministic and offline.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable
from pathlib import Path

from .tiny_models import (
    _build_atomically,
    _is_complete,
    _locked,
    _remove_stale,
    _write_json,
)

TINY_DIR = "tiny"
# Base model folder -> the adapters built for it (name prefix, count).
TINY_ADAPTER_SETS: dict[str, tuple[str, int]] = {"phi-3.5-mini-tiny": ("phi-3.5-mini", 8)}
RANK = 8
ALPHA = 16
FACTOR_STD = 0.5
# Phi-3's fused projections, as vLLM's Phi3ForCausalLM names them (packed_modules_mapping).
PHI3_TARGET_MODULES = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


def tiny_adapter_names() -> list[str]:
    """Every adapter this module builds, as its path relative to the adapter store."""
    return [
        f"{TINY_DIR}/{prefix}-{i}"
        for prefix, count in TINY_ADAPTER_SETS.values()
        for i in range(1, count + 1)
    ]


def phi3_lora_shapes(base_config: dict) -> dict[str, tuple[str, int, int]]:
    """Target module -> (its submodule, in features, out features) for a Phi-3 config."""
    hidden = int(base_config["hidden_size"])
    heads = int(base_config["num_attention_heads"])
    kv_heads = int(base_config.get("num_key_value_heads") or heads)
    head_dim = hidden // heads
    intermediate = int(base_config["intermediate_size"])
    return {
        "qkv_proj": ("self_attn", hidden, (heads + 2 * kv_heads) * head_dim),
        "o_proj": ("self_attn", heads * head_dim, hidden),
        "gate_up_proj": ("mlp", hidden, 2 * intermediate),
        "down_proj": ("mlp", intermediate, hidden),
    }


def _adapter_filler(base_name: str, base_config: dict, seed: int) -> Callable[[Path], None]:
    def fill(dst: Path) -> None:
        import torch
        from safetensors.torch import save_file

        generator = torch.Generator().manual_seed(seed)
        tensors: dict[str, torch.Tensor] = {}
        shapes = phi3_lora_shapes(base_config)
        for layer in range(int(base_config["num_hidden_layers"])):
            for module in PHI3_TARGET_MODULES:
                parent, fan_in, fan_out = shapes[module]
                prefix = f"base_model.model.model.layers.{layer}.{parent}.{module}"
                a = torch.randn(RANK, fan_in, generator=generator) * FACTOR_STD
                b = torch.randn(fan_out, RANK, generator=generator) * FACTOR_STD
                tensors[f"{prefix}.lora_A.weight"] = a.to(torch.bfloat16).contiguous()
                tensors[f"{prefix}.lora_B.weight"] = b.to(torch.bfloat16).contiguous()
        save_file(tensors, str(dst / "adapter_model.safetensors"), metadata={"format": "pt"})
        _write_json(
            dst / "adapter_config.json",
            {
                "base_model_name_or_path": base_name,
                "bias": "none",
                "fan_in_fan_out": False,
                "lora_alpha": ALPHA,
                "lora_dropout": 0.0,
                "peft_type": "LORA",
                "r": RANK,
                "target_modules": list(PHI3_TARGET_MODULES),
                "task_type": "CAUSAL_LM",
            },
        )

    return fill


def build_tiny_adapters(
    adapter_store: Path,
    model_dir: Path,
    *,
    force: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Path]:
    """Build (or reuse) the tiny adapters under `adapter_store`/tiny for the tiny models in
    `model_dir` (build those first: tiny_models.build_tiny_models). Returns {name relative to
    the store, e.g. "tiny/phi-3.5-mini-1": its folder}."""
    store = Path(adapter_store).resolve()
    tiny = store / TINY_DIR
    targets: dict[str, tuple[Path, str, int]] = {}
    for base_name, (prefix, count) in TINY_ADAPTER_SETS.items():
        for i in range(1, count + 1):
            name = f"{TINY_DIR}/{prefix}-{i}"
            targets[name] = (store / name, base_name, zlib.crc32(name.encode()))
    folders = {name: folder for name, (folder, _, _) in targets.items()}
    if not force and all(_is_complete(folder) for folder in folders.values()):
        return folders
    tiny.mkdir(parents=True, exist_ok=True)
    with _locked(tiny):
        _remove_stale(tiny)
        for name, (folder, base_name, seed) in targets.items():
            if not force and _is_complete(folder):
                continue
            config_file = Path(model_dir).resolve() / base_name / "config.json"
            base_config = json.loads(config_file.read_text(encoding="utf-8"))
            start = time.monotonic()
            _build_atomically(folder, _adapter_filler(base_name, base_config, seed))
            log(f"tiny adapters: built {name} in {time.monotonic() - start:.2f}s -> {folder}")
    return folders
