"""How `VLLMEngine` answers what vLLM reports about a request, without running a model: the
engine's `AsyncLLM` is replaced by a stand-in that raises or ends as vLLM 0.32 does.

A schema the grammar backend refuses is a client error naming the request field it came from
(vLLM raises `VLLMValidationError` from `generate`, with xgrammar's log stamp in the message);
a request vLLM ends with finish_reason "error" never reaches the client as that reason."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from services.catalog.loader import load_catalog
from services.errors import GenerationFailed, InvalidRequest
from services.pools.engine import GenerationChunk, GenerationRequest, SamplingOptions, StructuredOutput
from services.pools.vllm_engine import VLLMEngine

# Real vLLM parts: its exception types (importing vLLM costs 10-15 s of CPU, a minute on a
# loaded machine), so these run with the cluster layer, not the fast one.
pytestmark = pytest.mark.cluster

PARAM = "response_format.json_schema.schema"
XGRAMMAR_REFUSAL = (
    "Failed to transform json schema into a grammar: [18:19:49] "
    '/project/cpp/json_schema_converter.cc:4944: Unsupported type "nonsense"\n'
)


@dataclass
class _Completion:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    index: int = 0
    logprobs: Any = None


@dataclass
class _Output:
    outputs: list[_Completion]
    finished: bool
    prompt_token_ids: list[int] = field(default_factory=lambda: [1, 2, 3])
    num_cached_tokens: int = 0


class _StandIn:
    """AsyncLLM's generate/abort: `generate` yields `outputs`, then raises `error` if set."""

    def __init__(self, outputs: list[_Output], error: Exception | None = None) -> None:
        self._outputs = outputs
        self._error = error
        self.aborted: list[str] = []

    async def generate(self, *_: Any, **__: Any) -> AsyncIterator[_Output]:
        for out in self._outputs:
            yield out
        if self._error is not None:
            raise self._error

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)


def _engine(stand_in: _StandIn) -> VLLMEngine:
    pool = next(p for p in load_catalog("local").pools if p.name == "text")
    engine = VLLMEngine(pool, model_path="unused")
    engine._engine = stand_in
    return engine


def _request(structured: StructuredOutput | None) -> GenerationRequest:
    return GenerationRequest(
        request_id="r", model="phi-3.5-mini", sampling=SamplingOptions(max_tokens=8, structured=structured)
    )


async def _run(engine: VLLMEngine, request: GenerationRequest) -> list[GenerationChunk]:
    return [c async for c in engine._generate(request, {"prompt": "hi"}, None, first_index=0)]


async def test_a_refused_schema_names_its_field_without_the_backends_stamp() -> None:
    from vllm.exceptions import VLLMValidationError  # here: collecting the fast layer imports no vLLM

    stand_in = _StandIn([], VLLMValidationError(XGRAMMAR_REFUSAL))
    with pytest.raises(InvalidRequest) as refused:
        await _run(
            _engine(stand_in), _request(StructuredOutput(json_schema='{"type":"nonsense"}', param=PARAM))
        )
    assert refused.value.param == PARAM
    assert refused.value.message == (
        "the schema cannot be compiled: Failed to transform json schema into a grammar: "
        'Unsupported type "nonsense"'
    )
    assert len(stand_in.aborted) == 1  # nothing left running in the engine


async def test_a_grammar_that_fails_in_the_engine_core_is_a_400_naming_the_schema() -> None:
    # vLLM's scheduler ends a request whose grammar compile raised with FINISHED_ERROR.
    stand_in = _StandIn([_Output([_Completion("", [], "error")], finished=True)])
    with pytest.raises(InvalidRequest) as refused:
        await _run(_engine(stand_in), _request(StructuredOutput(json_schema="{}", param=PARAM)))
    assert refused.value.param == PARAM


@pytest.mark.parametrize("structured", [None, StructuredOutput(json_object=True)])
async def test_an_error_finish_after_tokens_or_without_a_schema_is_a_failed_generation(
    structured: StructuredOutput | None,
) -> None:
    outputs = [_Output([_Completion("{", [5], None)], finished=False)]
    if structured is None:
        outputs = []
    outputs.append(_Output([_Completion("", [], "error")], finished=True))
    with pytest.raises(GenerationFailed):
        await _run(_engine(_StandIn(outputs)), _request(structured))
