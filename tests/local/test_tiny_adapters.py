"""The tiny LoRA adapter builder (services/local/tiny_adapters.py): real builds, no engine.

That each adapter changes the engine's greedy output is tests/pools/test_adapters_engine.py's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from services.local.tiny_adapters import (
    PHI3_TARGET_MODULES,
    RANK,
    build_tiny_adapters,
    phi3_lora_shapes,
    tiny_adapter_names,
)
from services.local.tiny_models import MARKER


@pytest.fixture(scope="module")
def built(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    store = tmp_path_factory.mktemp("adapters")
    model_dir = tiny_models["phi-3.5-mini-tiny"].parent
    logs: list[str] = []
    return store, model_dir, build_tiny_adapters(store, model_dir, log=logs.append), logs


def test_builds_eight_mini_adapters_in_the_store(built):  # type: ignore[no-untyped-def]
    store, _, folders, logs = built
    assert list(folders) == tiny_adapter_names()
    assert list(folders) == [f"tiny/phi-3.5-mini-{i}" for i in range(1, 9)]
    for name, folder in folders.items():
        assert folder == store.resolve() / name
        assert (folder / MARKER).is_file()
        assert {p.name for p in folder.iterdir()} == {
            MARKER,
            "adapter_config.json",
            "adapter_model.safetensors",
        }
    assert len(logs) == 8


def test_peft_layout_with_the_base_models_shapes(built):  # type: ignore[no-untyped-def]
    _, model_dir, folders, _ = built
    base = json.loads((model_dir / "phi-3.5-mini-tiny" / "config.json").read_text())
    shapes = phi3_lora_shapes(base)
    assert shapes["qkv_proj"][1:] == (128, 384) and shapes["down_proj"][1:] == (256, 128)
    for folder in folders.values():
        config = json.loads((folder / "adapter_config.json").read_text())
        assert config["peft_type"] == "LORA" and config["r"] == RANK
        assert sorted(config["target_modules"]) == sorted(PHI3_TARGET_MODULES)
        with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
            names = set(f.keys())
            assert len(names) == base["num_hidden_layers"] * len(PHI3_TARGET_MODULES) * 2
            for layer in range(base["num_hidden_layers"]):
                for module, (parent, fan_in, fan_out) in shapes.items():
                    prefix = f"base_model.model.model.layers.{layer}.{parent}.{module}"
                    a = f.get_tensor(f"{prefix}.lora_A.weight")
                    b = f.get_tensor(f"{prefix}.lora_B.weight")
                    assert tuple(a.shape) == (RANK, fan_in) and tuple(b.shape) == (fan_out, RANK)
                    assert str(a.dtype) == "torch.bfloat16"
                    assert bool(a.isfinite().all()) and float(b.abs().max()) > 0


def test_deterministic_distinct_and_skipped_when_complete(built, tmp_path: Path):  # type: ignore[no-untyped-def]
    store, model_dir, folders, _ = built
    again = build_tiny_adapters(tmp_path, model_dir, log=lambda _: None)
    weights = {name: (folder / "adapter_model.safetensors").read_bytes() for name, folder in folders.items()}
    for name, folder in again.items():
        assert (folder / "adapter_model.safetensors").read_bytes() == weights[name]
    assert len(set(weights.values())) == len(weights)  # a seed of its own each
    stamp = {name: folder.stat().st_mtime_ns for name, folder in folders.items()}
    logs: list[str] = []
    assert build_tiny_adapters(store, model_dir, log=logs.append) == folders
    assert logs == [] and {n: f.stat().st_mtime_ns for n, f in folders.items()} == stamp


def test_an_incomplete_folder_is_rebuilt(built, tmp_path: Path):  # type: ignore[no-untyped-def]
    _, model_dir, _, _ = built
    folders = build_tiny_adapters(tmp_path, model_dir, log=lambda _: None)
    broken = folders["tiny/phi-3.5-mini-3"]
    (broken / MARKER).unlink()
    (broken / "adapter_model.safetensors").write_bytes(b"torn")
    logs: list[str] = []
    build_tiny_adapters(tmp_path, model_dir, log=logs.append)
    assert len(logs) == 1 and "phi-3.5-mini-3" in logs[0]
    assert (broken / MARKER).is_file() and (broken / "adapter_model.safetensors").stat().st_size > 1000
