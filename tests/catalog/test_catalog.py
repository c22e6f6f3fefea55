"""Catalog validation: shipped profiles load; a bad catalog names the field and the fix."""

from __future__ import annotations

import copy

import pytest
import yaml

from services.catalog.loader import PROFILES_DIR, CatalogError, load_catalog, parse_catalog
from services.catalog.models import Modality, Platform


def _local_raw() -> dict:  # type: ignore[type-arg]
    return yaml.safe_load((PROFILES_DIR / "local.yaml").read_text())  # type: ignore[no-any-return]


def test_local_profile_has_three_models_on_cpu() -> None:
    catalog = load_catalog("local")
    assert catalog.platform is Platform.cpu
    pools = {p.name: p for p in catalog.enabled_pools}
    assert set(pools) == {"text", "text-long", "moe", "vision"}
    assert catalog.long_pool_of(pools["text"]) is pools["text-long"]
    assert catalog.front_pool_of(pools["text-long"]) is pools["text"]
    assert catalog.tiny_models().count("phi-3.5-mini-tiny") == 1
    assert pools["vision"].modality is Modality.vision
    assert pools["text"].engine.kv_cache_memory_bytes
    assert pools["text"].engine.enforce_eager
    assert {"phi-3.5-mini", "phi-3.5-moe", "phi-3.5-vision"} <= {
        n for p in catalog.enabled_pools for n in p.names
    }


def test_h100_profile_fits_80gb_gpus() -> None:
    catalog = load_catalog("h100")
    assert catalog.platform is Platform.cuda
    pools = {p.name: p for p in catalog.pools}
    assert pools["text"].model == "microsoft/Phi-3.5-mini-instruct"
    assert pools["moe"].engine.tensor_parallel_size == 2
    assert pools["moe"].engine.enable_expert_parallel
    assert pools["moe"].deployment.ray_actor_options["num_gpus"] == 2
    assert pools["text"].deployment.ray_actor_options["num_gpus"] == 1
    fp8 = load_catalog("h100-fp8")
    moe = {p.name: p for p in fp8.pools}["moe"]
    assert moe.engine.quantization == "fp8" and moe.engine.tensor_parallel_size == 1


def test_unknown_engine_field_is_named_with_pool() -> None:
    raw = _local_raw()
    raw["pools"][1]["engine"]["max_modle_len"] = 4096
    with pytest.raises(CatalogError) as info:
        parse_catalog(raw, source="test.yaml")
    message = str(info.value)
    assert "pools[moe].engine.max_modle_len" in message
    assert "unknown field" in message and "spelling" in message


def test_missing_and_bad_values_say_how_to_fix() -> None:
    raw = _local_raw()
    del raw["pools"][0]["engine"]["max_model_len"]
    raw["pools"][2]["max_images_per_request"] = 0
    with pytest.raises(CatalogError) as info:
        parse_catalog(raw)
    message = str(info.value)
    assert "pools[text].engine.max_model_len: required field is missing" in message
    assert "pools[vision]" in message and "max_images_per_request >= 1" in message


def test_duplicate_model_names_are_refused() -> None:
    raw = _local_raw()
    raw["pools"][1] = copy.deepcopy(raw["pools"][1])
    raw["pools"][1]["aliases"] = ["phi-3.5-mini"]
    with pytest.raises(CatalogError, match="'phi-3.5-mini' is served by pools 'text' and 'moe'"):
        parse_catalog(raw)


def test_replicas_and_autoscaling_are_exclusive() -> None:
    raw = _local_raw()
    raw["pools"][0]["deployment"] = {"num_replicas": 2, "autoscaling": {"min_replicas": 1, "max_replicas": 3}}
    with pytest.raises(CatalogError, match="num_replicas: null"):
        parse_catalog(raw)


def test_unknown_profile_lists_known_ones() -> None:
    with pytest.raises(CatalogError, match="h100, h100-fp8, local"):
        load_catalog("nope")


def test_bad_yaml_is_a_catalog_error(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "c.yaml"
    path.write_text("platform: cpu\npools: [\n")
    with pytest.raises(CatalogError, match="not valid YAML"):
        load_catalog(str(path))


def test_lora_settings_are_checked_where_they_would_fail_later() -> None:
    """LoRA settings that vLLM would refuse at start, or that break adapters on one of a
    model's two pools, are refused at catalog load, naming the pool and the fix."""
    raw = _local_raw()
    long = next(pool for pool in raw["pools"] if pool["name"] == "text-long")
    long["engine"] = {**long["engine"], "max_lora_rank": 64}
    with pytest.raises(CatalogError, match="other LoRA settings"):
        parse_catalog(raw)

    raw = _local_raw()
    text = raw["pools"][0]
    text["engine"] = {**text["engine"], "max_cpu_loras": 1}
    with pytest.raises(CatalogError, match=r"max_cpu_loras \(1\) is below max_loras \(2\)"):
        parse_catalog(raw)

    raw = _local_raw()
    vision = next(pool for pool in raw["pools"] if pool["name"] == "vision")
    vision["engine"] = {**vision["engine"], "enable_lora": True}
    with pytest.raises(CatalogError, match=r"pools\[vision\].*no LoRA"):
        parse_catalog(raw)


def test_lora_settings_reach_vllm_only_with_lora_on() -> None:
    catalog = load_catalog("local")
    pools = {pool.name: pool for pool in catalog.pools}
    text = pools["text"].engine.to_engine_kwargs()
    assert (text["enable_lora"], text["max_loras"], text["max_cpu_loras"], text["max_lora_rank"]) == (
        True,
        2,
        4,
        16,
    )
    assert pools["text"].engine.adapters_per_replica == 4
    moe = pools["moe"].engine.to_engine_kwargs()
    assert not {"enable_lora", "max_loras", "max_cpu_loras", "max_lora_rank"} & set(moe)
    assert pools["moe"].engine.adapters_per_replica == 0


def test_tensor_parallel_pools_name_their_executor_and_reserve_its_gpus() -> None:
    """A TP=2 replica that reserves 2 GPUs while vLLM's Ray executor asks Ray for 2 more would
    wait for ever: the h100 MoE pool runs its TP workers as processes on the replica's GPUs,
    and a catalog that leaves the executor to vLLM, or reserves other GPUs, is refused."""
    moe = next(pool for pool in load_catalog("h100").pools if pool.name == "moe")
    kwargs = moe.engine.to_engine_kwargs()
    assert (kwargs["tensor_parallel_size"], kwargs["distributed_executor_backend"]) == (2, "mp")
    assert moe.deployment.ray_actor_options["num_gpus"] == moe.engine.tensor_parallel_size

    raw = yaml.safe_load((PROFILES_DIR / "h100.yaml").read_text())
    raw_moe = next(pool for pool in raw["pools"] if pool["name"] == "moe")
    without = copy.deepcopy(raw)
    del next(p for p in without["pools"] if p["name"] == "moe")["engine"]["distributed_executor_backend"]
    with pytest.raises(CatalogError, match=r"pools\[moe\].*needs distributed_executor_backend: mp"):
        parse_catalog(without)
    raw_moe["deployment"]["ray_actor_options"] = {**raw_moe["deployment"]["ray_actor_options"], "num_gpus": 1}
    with pytest.raises(CatalogError, match=r"num_gpus \(1\) must equal tensor_parallel_size \(2\)"):
        parse_catalog(raw)
