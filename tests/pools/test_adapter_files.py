"""Adapter validation on real files (issue 14): each malformed adapter the engine would
choke on (or, worse, accept and be poisoned by) is refused with a message that says
what is wrong, against the tiny Phi-3.5-mini's real safetensors headers."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from services.errors import InvalidAdapter, InvalidRequest
from services.pools.adapter_files import base_modules, check_adapter_folder
from services.pools.adapter_sources import ReplicaAdapterCheck
from tests.lora_files import TINY_MINI_SHAPES, lora_tensors, peft_config, write_adapter

MAX_RANK = 16


@pytest.fixture
def base(tiny_models: dict[str, Path]) -> str:
    return str(tiny_models["phi-3.5-mini-tiny"])


def refused(folder: Path, base: str, *, max_bytes: int = 1024**3) -> str:
    with pytest.raises(InvalidAdapter) as caught:
        check_adapter_folder(folder, base_model_path=base, max_rank=MAX_RANK, max_bytes=max_bytes)
    error = caught.value
    assert isinstance(error, InvalidRequest)  # a 400 through the one error table
    assert (error.param, error.code) == ("source", "invalid_adapter")
    return error.message


def test_a_valid_adapter_and_its_facts(tmp_path: Path, base: str) -> None:
    files = check_adapter_folder(write_adapter(tmp_path / "a"), base_model_path=base, max_rank=MAX_RANK)
    assert files.rank == 8
    assert files.alpha == 16.0
    assert files.target_modules == ("down_proj", "gate_up_proj", "o_proj", "qkv_proj")
    assert (files.layers, files.tensors, files.dtype, files.base_checked) == (2, 16, "BF16", True)
    assert files.size_bytes == (tmp_path / "a" / "adapter_model.safetensors").stat().st_size


def test_the_base_models_linear_modules_come_from_its_headers(base: str) -> None:
    modules = base_modules(base)
    assert modules is not None
    assert modules.shapes["model.layers.1.self_attn.qkv_proj"] == (384, 128)
    assert modules.names == {"qkv_proj", "o_proj", "gate_up_proj", "down_proj"}
    assert base_modules("microsoft/Phi-3.5-mini-instruct") is None  # not on this disk


def test_layout(tmp_path: Path, base: str) -> None:
    assert "not a folder" in refused(tmp_path / "missing", base)
    (tmp_path / "file").write_text("x")
    assert "not a folder" in refused(tmp_path / "file", base)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no adapter_config.json and no adapter_model.safetensors" in refused(empty, base)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text(json.dumps(peft_config()))
    assert "no adapter_model.safetensors" in refused(no_weights, base)


def test_pickled_weights_are_refused_even_beside_safetensors(tmp_path: Path, base: str) -> None:
    folder = write_adapter(tmp_path / "a")
    torch.save(lora_tensors(), folder / "adapter_model.bin")
    assert "adapter_model.bin is a pickle" in refused(folder, base)


def test_a_fifo_is_not_read(tmp_path: Path, base: str) -> None:
    folder = write_adapter(tmp_path / "a")
    (folder / "adapter_config.json").unlink()
    os.mkfifo(folder / "adapter_config.json")  # reading it would block forever
    assert "adapter_config.json is not a regular file" in refused(folder, base)


@pytest.mark.parametrize(
    ("config_text", "message"),
    [
        ("{not json", "adapter_config.json is not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        (json.dumps(peft_config(peft_type="IA3")), "peft_type 'IA3'; only LORA"),
        (json.dumps({**peft_config(), "r": None}), "'r' as a positive integer, got None"),
        (json.dumps({k: v for k, v in peft_config().items() if k != "r"}), "'r' as a positive integer"),
        (json.dumps(peft_config(r="8")), "got '8'"),
        (json.dumps(peft_config(use_dora=True)), "DoRA (use_dora) is not supported"),
        (json.dumps(peft_config(bias="all")), "bias 'all' is not supported"),
        (
            json.dumps(peft_config(modules_to_save=["lm_head"])),
            "modules_to_save ['lm_head'] is not supported",
        ),
        (json.dumps(peft_config(target_modules=[])), "needs target_modules"),
        (json.dumps(peft_config(lora_alpha="x")), "lora_alpha as a positive number, got 'x'"),
        (json.dumps({k: v for k, v in peft_config().items() if k != "lora_alpha"}), "needs lora_alpha"),
        (json.dumps(peft_config(init_lora_weights="pissa")), "init_lora_weights 'pissa' modifies the base"),
        (json.dumps(peft_config(use_bdlora={"x": 1})), "block-diagonal LoRA"),
        (json.dumps(peft_config(rank_pattern={"(a+)+$": 4})), "rank_pattern must map module names"),
        (json.dumps(peft_config(alpha_pattern={"qkv_proj": -1})), "alpha_pattern must map module names"),
    ],
)
def test_config(tmp_path: Path, base: str, config_text: str, message: str) -> None:
    folder = write_adapter(tmp_path / "a")
    (folder / "adapter_config.json").write_text(config_text)
    assert message in refused(folder, base)


def test_rank_above_the_pools_max_lora_rank(tmp_path: Path, base: str) -> None:
    message = refused(write_adapter(tmp_path / "a", rank=32), base)
    assert message == (
        "the adapter's rank 32 is above this model's max_lora_rank 16; train it with a smaller r"
    )
    pattern = write_adapter(tmp_path / "b", config=peft_config(rank_pattern={"qkv_proj": 64}))
    assert "rank 64 is above" in refused(pattern, base)


def test_target_modules_that_the_base_model_does_not_have(tmp_path: Path, base: str) -> None:
    folder = write_adapter(tmp_path / "a", config=peft_config(target_modules=["qkv_proj", "q_proj", "fc1"]))
    message = refused(folder, base)
    assert "target_modules ['fc1', 'q_proj'] are not modules of the base model" in message
    assert "['down_proj', 'gate_up_proj', 'o_proj', 'qkv_proj']" in message
    # A regular expression is compiled, never run (it could be made to backtrack for ever):
    # the tensors' names decide, and they are checked against the base model.
    assert "not a valid regular expression" in refused(
        write_adapter(tmp_path / "b", config=peft_config(target_modules="(")), base
    )
    redos = write_adapter(tmp_path / "r", config=peft_config(target_modules="(a+)+$"))
    assert check_adapter_folder(redos, base_model_path=base, max_rank=MAX_RANK).base_checked
    ok = write_adapter(
        tmp_path / "c", config=peft_config(target_modules=r".*\.(qkv_proj|o_proj|gate_up_proj|down_proj)")
    )
    assert check_adapter_folder(ok, base_model_path=base, max_rank=MAX_RANK).base_checked


def test_tensor_names_that_map_to_no_base_module(tmp_path: Path, base: str) -> None:
    tensors = lora_tensors()
    tensors["base_model.model.model.layers.7.self_attn.qkv_proj.lora_A.weight"] = torch.zeros(8, 128)
    tensors["base_model.model.model.layers.7.self_attn.qkv_proj.lora_B.weight"] = torch.zeros(384, 8)
    message = refused(write_adapter(tmp_path / "a", tensors=tensors), base)
    assert "module model.layers.7.self_attn.qkv_proj is not a linear module of the base model" in message

    embedding = lora_tensors()
    embedding["base_model.model.model.embed_tokens.lora_embedding_A"] = torch.zeros(8, 32064)
    assert "is not a LoRA weight of a linear module" in refused(
        write_adapter(tmp_path / "b", tensors=embedding), base
    )

    unprefixed = {k.removeprefix("base_model.model."): v for k, v in lora_tensors().items()}
    assert "is not a LoRA weight" in refused(write_adapter(tmp_path / "c", tensors=unprefixed), base)


def test_a_lora_a_without_its_lora_b(tmp_path: Path, base: str) -> None:
    tensors = lora_tensors()
    del tensors["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    message = refused(write_adapter(tmp_path / "a", tensors=tensors), base)
    assert message.endswith("module model.layers.1.mlp.down_proj has no lora_B weight")


def test_shapes_that_disagree_with_the_base_weight(tmp_path: Path, base: str) -> None:
    # The case vLLM's add_lora accepted (measured): qkv_proj's lora_A with the wrong input size.
    tensors = lora_tensors()
    tensors["base_model.model.model.layers.0.self_attn.qkv_proj.lora_A.weight"] = torch.zeros(
        8, 64, dtype=torch.bfloat16
    )
    message = refused(write_adapter(tmp_path / "a", tensors=tensors), base)
    assert message == (
        "adapter_model.safetensors: module model.layers.0.self_attn.qkv_proj has lora_A [8, 64] and "
        "lora_B [384, 8]; with rank 8 and the base weight's (out, in) = (384, 128) they must be "
        "[8, 128] and [384, 8]"
    )
    # Weights of rank 4 under a config that says r=8.
    small = write_adapter(tmp_path / "b", config=peft_config(rank=8), tensors=lora_tensors(rank=4))
    assert "with rank 8" in refused(small, base)
    # A 3-D weight.
    cube = lora_tensors()
    cube["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"] = torch.zeros(128, 8, 1)
    assert "must be 2-D" in refused(write_adapter(tmp_path / "c", tensors=cube), base)


def test_non_float_weights(tmp_path: Path, base: str) -> None:
    tensors = lora_tensors()
    tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"] = torch.zeros(
        8, 256, dtype=torch.int32
    )
    assert "has dtype I32; LoRA weights must be F16, BF16, F32 or F64" in refused(
        write_adapter(tmp_path / "a", tensors=tensors), base
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values(tmp_path: Path, base: str, dtype: torch.dtype, bad: float) -> None:
    # A NaN adapter poisoned the CPU engine for later, valid adapters (measured): refused here.
    tensors = lora_tensors(dtype=dtype)
    name = "base_model.model.model.layers.1.mlp.gate_up_proj.lora_B.weight"
    tensors[name][311, 5] = bad
    message = refused(write_adapter(tmp_path / "a", tensors=tensors), base)
    assert message == f"adapter_model.safetensors: tensor {name} holds NaN or infinite values"
    # The same weights without the bad value pass: the check is on the values, not the dtype.
    tensors[name][311, 5] = 0.5
    assert check_adapter_folder(
        write_adapter(tmp_path / "b", tensors=tensors), base_model_path=base, max_rank=MAX_RANK
    )


def test_size_cap(tmp_path: Path, base: str) -> None:
    folder = write_adapter(tmp_path / "a")
    size = (folder / "adapter_model.safetensors").stat().st_size
    assert f"adapter_model.safetensors is {size} bytes, over the limit of 1000" in refused(
        folder, base, max_bytes=1000
    )
    (folder / "adapter_config.json").write_text(" " * (1024 * 1024 + 1))
    assert "adapter_config.json is 1048577 bytes, over the limit" in refused(folder, base)


def test_files_that_are_not_safetensors(tmp_path: Path, base: str) -> None:
    folder = write_adapter(tmp_path / "a")
    weights = folder / "adapter_model.safetensors"
    weights.write_bytes(b"\x00" * 7)
    assert "not a valid safetensors file" in refused(folder, base)
    # A header that claims more data than the file holds (a truncated upload).
    write_adapter(folder)
    weights.write_bytes(weights.read_bytes()[:-100])
    assert "not a valid safetensors file" in refused(folder, base)


def test_without_the_base_weights_the_files_alone_are_checked(tmp_path: Path) -> None:
    hub_id = "microsoft/Phi-3.5-mini-instruct"
    files = check_adapter_folder(write_adapter(tmp_path / "a"), base_model_path=hub_id, max_rank=MAX_RANK)
    assert not files.base_checked
    assert files.target_modules == tuple(sorted(name.split(".")[-1] for name in TINY_MINI_SHAPES))
    tensors = lora_tensors()
    tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"][0, 0] = float("nan")
    with pytest.raises(InvalidAdapter, match="NaN"):
        check_adapter_folder(
            write_adapter(tmp_path / "b", tensors=tensors), base_model_path=hub_id, max_rank=MAX_RANK
        )
    with pytest.raises(InvalidAdapter, match="with rank 8"):
        check_adapter_folder(
            write_adapter(tmp_path / "c", tensors=lora_tensors(rank=4), config=peft_config(rank=8)),
            base_model_path=hub_id,
            max_rank=MAX_RANK,
        )
    outside = {
        "base_model.model.lm_head.lora_A.weight": torch.zeros(8, 128),
        "base_model.model.lm_head.lora_B.weight": torch.zeros(32064, 8),
    }
    with pytest.raises(InvalidAdapter, match="not inside one of the model's layers"):
        check_adapter_folder(
            write_adapter(tmp_path / "d", tensors=outside), base_model_path=hub_id, max_rank=MAX_RANK
        )


def test_the_tiny_adapters_pass(tiny_adapters: dict[str, Path], base: str) -> None:
    # What `phiserve up` builds for the local profile must register (and load) as it is.
    assert len(tiny_adapters) == 8
    for folder in tiny_adapters.values():
        files = check_adapter_folder(folder, base_model_path=base, max_rank=MAX_RANK)
        assert (files.rank, files.layers, files.base_checked) == (8, 2, True)
        assert files.target_modules == ("down_proj", "gate_up_proj", "o_proj", "qkv_proj")


def test_a_path_the_os_refuses_is_a_400_not_a_500(tmp_path: Path, base: str) -> None:
    assert "cannot be read: File name too long" in refused(tmp_path / ("x" * 300), base)


def test_a_sharded_base_model_is_read_through_its_index(tmp_path: Path) -> None:
    # As the real Phi-3.5-mini is stored (two shards and model.safetensors.index.json); the
    # headers alone are read, so shards holding a header and no data are enough here.
    base = tmp_path / "base"
    base.mkdir()
    weight_map = {}
    for shard, layers in (
        ("model-00001-of-00002.safetensors", [0]),
        ("model-00002-of-00002.safetensors", [1]),
    ):
        header = {
            f"model.layers.{layer}.{module}.weight": {
                "dtype": "BF16",
                "shape": list(shape),
                "data_offsets": [0, 0],
            }
            for layer in layers
            for module, shape in TINY_MINI_SHAPES.items()
        }
        weight_map.update(dict.fromkeys(header, shard))
        raw = json.dumps(header).encode()
        (base / shard).write_bytes(len(raw).to_bytes(8, "little") + raw)
    (base / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    files = check_adapter_folder(write_adapter(tmp_path / "a"), base_model_path=str(base), max_rank=MAX_RANK)
    assert (files.base_checked, files.layers) == (True, 2)
    modules = base_modules(str(base))
    assert modules is not None and modules.shapes["model.layers.1.mlp.down_proj"] == (128, 256)
    shapes = lora_tensors()
    shapes["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"] = torch.zeros(
        8, 128, dtype=torch.bfloat16
    )
    assert "must be [8, 256] and [128, 8]" in refused(
        write_adapter(tmp_path / "b", tensors=shapes), str(base)
    )


def test_the_replica_refuses_a_registered_folder_swapped_for_a_link_out(tmp_path: Path, base: str) -> None:
    """Registered inside the store, then replaced on the shared volume by a link to a folder
    outside it: the replica's check (what runs before any engine sees the files) refuses it,
    as a 400 on the request's model, even though the files it would reach are valid."""
    store, outside = tmp_path / "store", tmp_path / "outside"
    store.mkdir()
    write_adapter(outside / "evil")
    write_adapter(store / "mine")
    check = ReplicaAdapterCheck(store, [], max_bytes=1024**3)
    assert check(store / "mine", base_model_path=base, max_rank=16).rank == 8
    shutil.rmtree(store / "mine")
    (store / "mine").symlink_to(outside / "evil")
    with pytest.raises(InvalidAdapter) as refused_load:
        check(store / "mine", base_model_path=base, max_rank=16)
    assert refused_load.value.param == "model" and "outside the adapter store" in refused_load.value.message


def test_the_replica_holds_adapters_to_the_deployments_size_cap(tmp_path: Path, base: str) -> None:
    write_adapter(tmp_path / "a")
    with pytest.raises(InvalidAdapter):
        ReplicaAdapterCheck(tmp_path, [], max_bytes=1024)(tmp_path / "a", base_model_path=base, max_rank=16)
