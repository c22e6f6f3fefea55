"""response_format reaches the engine as a structured-output constraint (issue 11, item 1)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.catalog.loader import load_catalog
from services.errors import InvalidRequest
from services.inference.protocol.chat import ChatCompletionRequest
from services.inference.sampling import sampling_options
from services.pools.engine import StructuredOutput

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}


def _options(response_format: dict[str, Any] | None) -> Any:
    body = ChatCompletionRequest.model_validate(
        {
            "model": "phi-3.5-mini",
            "messages": [{"role": "user", "content": "hi"}],
            **({"response_format": response_format} if response_format is not None else {}),
        }
    )
    catalog = load_catalog("local")
    pool = catalog.enabled_pools[0]
    return sampling_options(body, pool, catalog.platform)


def test_json_schema_is_sent_compact() -> None:
    structured = _options({"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}).structured
    param = "response_format.json_schema.schema"
    assert structured == StructuredOutput(json_schema=json.dumps(SCHEMA, separators=(",", ":")), param=param)


def test_json_object() -> None:
    assert _options({"type": "json_object"}).structured == StructuredOutput(json_object=True)


def test_a_json_schema_without_a_schema_is_refused() -> None:
    with pytest.raises(InvalidRequest) as refused:
        _options({"type": "json_schema", "json_schema": {"name": "r"}})
    assert refused.value.param == "response_format.json_schema.schema"
    assert "json_object" in str(refused.value)


@pytest.mark.parametrize("response_format", [None, {"type": "text"}])
def test_text_is_unconstrained(response_format: dict[str, Any] | None) -> None:
    assert _options(response_format).structured is None


@pytest.mark.parametrize(
    "response_format",
    [{"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "r", "schema": SCHEMA}}],
)
def test_json_output_with_ignore_eos_is_refused(response_format: dict[str, Any]) -> None:
    # Past the end of the JSON the grammar allows only the end of sequence; ignored, vLLM
    # goes on generating unconstrained text after the JSON.
    body = ChatCompletionRequest.model_validate(
        {
            "model": "phi-3.5-mini",
            "messages": [{"role": "user", "content": "hi"}],
            "response_format": response_format,
            "ignore_eos": True,
        }
    )
    with pytest.raises(InvalidRequest) as refused:
        body.structured_output()
    assert refused.value.param == "ignore_eos"
    text = body.model_copy(update={"response_format": None})
    assert text.structured_output() is None  # plain text may ignore the end of sequence
