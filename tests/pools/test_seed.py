"""Per-request `seed` on the real vLLM CPU engine, in-process (no Ray), with the local profile.

vLLM's model runner rewinds a seeded request's torch.Generator by its Philox offset whenever
the request's prompt is split across scheduler steps (chunked prefill); a CPU generator has no
offset ("CPU Generator does not use offset") and the engine dies. The local profile prefills
whole prompts (`enable_chunked_prefill: false`), so seeds are served there: these tests run
the exact load that killed the engine with chunked prefill on, and check that it survives and
that a seed makes sampling reproducible.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.catalog.loader import load_catalog
from services.catalog.models import EngineConfig, Platform, PoolConfig
from services.errors import InvalidRequest
from services.inference.sampling import SamplingFields, sampling_options

# What a pool replica sets on the CPU (services/app.py CPU_ENGINE_ENV), for the test process.
_ENGINE_ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# ~1,500 tokens on the tiny tokenizer: two of them do not fit one 2,048-token step, so with
# chunked prefill on, concurrent prompts straddle step boundaries (measured: the engine died).
_LONG = "import os\nimport sys\n" * 250
_SHORT = "def main():\n    return 1\n"
GENERATE_TIMEOUT_S = 240.0


def _text_pool() -> PoolConfig:
    # phi-3.5-mini's long pool (2048 tokens): the ~1,500-token prompts exceed the short one's 1024.
    return next(p for p in load_catalog("local").pools if p.name == "text-long")


@pytest.fixture(scope="module")
async def engine(tiny_models: dict[str, Path]) -> AsyncIterator[Any]:
    with pytest.MonkeyPatch.context() as env:
        for name, value in _ENGINE_ENV.items():
            env.setenv(name, value)
        # kv_cache_memory_bytes sizes the cache; a stray GiB setting would fight it.
        env.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        pool = _text_pool()
        args = AsyncEngineArgs(
            model=str(tiny_models["phi-3.5-mini-tiny"]),
            served_model_name=pool.name,
            **pool.engine.to_engine_kwargs(),
        )
        llm = AsyncLLM.from_engine_args(args)
        try:
            yield llm
        finally:
            llm.shutdown()


async def _generate(llm: Any, prompt: str, seed: int | None, *, max_tokens: int = 24) -> str:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    params = SamplingParams(
        temperature=1.0,
        seed=seed,
        max_tokens=max_tokens,
        ignore_eos=True,  # random weights: EOS could end a choice after a token or two
        output_kind=RequestOutputKind.FINAL_ONLY,
    )
    final = None
    async for out in llm.generate(prompt, params, request_id=uuid.uuid4().hex):
        final = out
    assert final is not None and len(final.outputs[0].token_ids) == max_tokens
    return str(final.outputs[0].text)


def _unique(prompt: str) -> str:
    # A fresh first block, so the prefix cache cannot serve the prompt and it is prefilled in full.
    return f"{uuid.uuid4().hex}\n{prompt}"


def test_local_profile_prefills_whole_prompts(engine: Any) -> None:
    scheduler = engine.vllm_config.scheduler_config
    assert scheduler.enable_chunked_prefill is False
    assert scheduler.max_num_batched_tokens >= _text_pool().engine.max_model_len
    assert scheduler.long_prefill_token_threshold == 0


async def test_same_seed_same_text_different_seed_different_text(engine: Any) -> None:
    prompt = _unique(_SHORT)
    first = await _generate(engine, prompt, seed=1234)
    assert await _generate(engine, prompt, seed=1234) == first
    assert await _generate(engine, prompt, seed=4321) != first


async def test_seeded_long_prompts_under_concurrency_survive_and_reproduce(engine: Any) -> None:
    # Six ~1,500-token prompts at once, seeded and unseeded alternating: the load that made
    # the engine raise "CPU Generator does not use offset" with chunked prefill on.
    prompts = [_unique(_LONG) for _ in range(6)]
    seeds = [None if i % 2 == 0 else 100 + i for i in range(6)]
    together = await asyncio.wait_for(
        asyncio.gather(*(_generate(engine, p, s) for p, s in zip(prompts, seeds, strict=True))),
        GENERATE_TIMEOUT_S,
    )
    # Alone (and now served from the prefix cache), a seeded prompt gives the same text.
    for i in (1, 3, 5):
        alone = await asyncio.wait_for(_generate(engine, prompts[i], seeds[i]), GENERATE_TIMEOUT_S)
        assert alone == together[i]
    assert await _generate(engine, prompts[1], seed=999) != together[1]
    # The engine is alive and serving after the load.
    await engine.check_health()
    assert len(await _generate(engine, _unique(_SHORT), seed=None, max_tokens=4)) > 0


class _Fields(SamplingFields):
    def logprobs_count(self) -> int | None:
        return None


def _fields(**overrides: Any) -> SamplingFields:
    return _Fields.model_validate({"model": "phi-3.5-mini", "seed": 7, **overrides})


def _pool_with(engine: EngineConfig) -> PoolConfig:
    return _text_pool().model_copy(update={"engine": engine})


def test_seed_is_accepted_on_every_local_pool() -> None:
    for pool in load_catalog("local").pools:
        assert pool.engine.enable_chunked_prefill is False, pool.name
        assert sampling_options(_fields(), pool, Platform.cpu).seed == 7


def test_seed_is_refused_on_a_cpu_pool_with_chunked_prefill() -> None:
    base = _text_pool().engine
    for chunked in (True, None):  # None: vLLM's default, which is on
        pool = _pool_with(base.model_copy(update={"enable_chunked_prefill": chunked}))
        with pytest.raises(InvalidRequest) as refused:
            sampling_options(_fields(), pool, Platform.cpu)
        assert refused.value.param == "seed"
        assert "chunked prefill" in str(refused.value)
        # CUDA generators rewind by offset: the same pool on a GPU takes the seed.
        assert sampling_options(_fields(), pool, Platform.cuda).seed == 7


def test_whole_prompt_prefill_needs_a_step_budget_of_the_context_window() -> None:
    base = _text_pool().engine.model_dump()
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        EngineConfig.model_validate({**base, "enable_chunked_prefill": False, "max_num_batched_tokens": 512})
    ok = EngineConfig.model_validate(
        {**base, "enable_chunked_prefill": False, "max_num_batched_tokens": 4096}
    )
    assert ok.to_engine_kwargs()["enable_chunked_prefill"] is False
