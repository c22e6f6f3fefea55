"""Writes PEFT LoRA adapter folders for tests, well-formed or broken on purpose.

The tiny Phi-3.5-mini's linear modules (tiny-models.md): hidden 128, 2 layers, qkv_proj
(384, 128), o_proj (128, 128), gate_up_proj (512, 128), down_proj (128, 256) as (out, in).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

TINY_MINI_SHAPES: dict[str, tuple[int, int]] = {
    "self_attn.qkv_proj": (384, 128),
    "self_attn.o_proj": (128, 128),
    "mlp.gate_up_proj": (512, 128),
    "mlp.down_proj": (128, 256),
}


def lora_tensors(
    *, rank: int = 8, layers: int = 2, seed: int = 0, dtype: torch.dtype = torch.bfloat16
) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, torch.Tensor] = {}
    for layer in range(layers):
        for module, (out_dim, in_dim) in TINY_MINI_SHAPES.items():
            prefix = f"base_model.model.model.layers.{layer}.{module}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, in_dim, generator=generator) * 0.5).to(
                dtype
            )
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out_dim, rank, generator=generator) * 0.5).to(
                dtype
            )
    return tensors


def peft_config(*, rank: int = 8, **overrides: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": 16,
        "target_modules": [name.split(".")[-1] for name in TINY_MINI_SHAPES],
        "bias": "none",
        "task_type": "CAUSAL_LM",
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "base_model_name_or_path": "phi-3.5-mini-tiny",
    }
    config.update(overrides)
    return config


def write_adapter(
    folder: Path,
    *,
    rank: int = 8,
    seed: int = 0,
    config: dict[str, Any] | None = None,
    tensors: dict[str, torch.Tensor] | None = None,
) -> Path:
    """A PEFT folder: `config` (default `peft_config(rank=rank)`) as adapter_config.json and
    `tensors` (default `lora_tensors(rank=rank, seed=seed)`) as adapter_model.safetensors."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(
        json.dumps(config if config is not None else peft_config(rank=rank))
    )
    save_file(
        tensors if tensors is not None else lora_tensors(rank=rank, seed=seed),
        str(folder / "adapter_model.safetensors"),
    )
    return folder
