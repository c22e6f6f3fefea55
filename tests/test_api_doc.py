"""docs/api.md's parameter tables against vLLM's request classes and phiserve's request models.

vLLM's fields are read from the source of its protocol modules with `ast`, not by importing
them: the import pulls in torch and the engine (65 s on this 2-core machine). The classes'
fields are their annotated class attributes (minus `ClassVar`s); their base,
`OpenAIBaseModel`, declares none, and a check below fails if that ever changes.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path
from types import NoneType
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from services.inference.errors import error_payload, invalid_request_from
from services.inference.protocol.chat import ChatCompletionRequest
from services.inference.protocol.completions import CompletionRequest

DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"
ROW = re.compile(
    r"^\| `(?P<name>[a-z_]+)` \| (?P<status>supported|refused) \| (?P<where>[^|]+) \| (?P<details>.+) \|$"
)
SECTIONS = {
    "chat": ("## POST /v1/chat/completions", "chat_completion/protocol.py", "ChatCompletionRequest"),
    "completions": ("## POST /v1/completions", "completion/protocol.py", "CompletionRequest"),
}
PHISERVE: dict[str, type[BaseModel]] = {"chat": ChatCompletionRequest, "completions": CompletionRequest}


def _vllm_openai_dir() -> Path:
    spec = importlib.util.find_spec("vllm")  # a top-level spec: vllm is located, not imported
    assert spec is not None and spec.submodule_search_locations, "vllm is not installed"
    return Path(next(iter(spec.submodule_search_locations))) / "entrypoints" / "openai"


def _class_fields(source: Path, class_name: str) -> tuple[list[str], list[str]]:
    """The annotated fields of `class_name` in `source`, and the names of its bases."""
    tree = ast.parse(source.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == class_name)
    fields = [
        stmt.target.id
        for stmt in cls.body
        if isinstance(stmt, ast.AnnAssign)
        and isinstance(stmt.target, ast.Name)
        and "ClassVar" not in ast.unparse(stmt.annotation)
        and not stmt.target.id.startswith("_")
    ]
    return fields, [ast.unparse(base) for base in cls.bases]


def vllm_fields(api: str) -> list[str]:
    _, path, class_name = SECTIONS[api]
    fields, bases = _class_fields(_vllm_openai_dir() / path, class_name)
    assert bases == ["OpenAIBaseModel"], f"vLLM's {class_name} has new bases {bases}: read their fields too"
    return fields


def table(api: str) -> dict[str, dict[str, str]]:
    heading = SECTIONS[api][0]
    text = DOC.read_text()
    assert heading in text, f"docs/api.md has no '{heading}' section"
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    rows: dict[str, dict[str, str]] = {}
    for line in section.splitlines():
        match = ROW.match(line.strip())
        if match:
            assert match["name"] not in rows, f"{api}: '{match['name']}' has two rows"
            rows[match["name"]] = match.groupdict()
    return rows


def test_vllm_base_model_declares_no_fields() -> None:
    base = _vllm_openai_dir().parent / "serve" / "engine" / "protocol.py"
    fields, _ = _class_fields(base, "OpenAIBaseModel")
    assert fields == []


@pytest.mark.parametrize("api", list(SECTIONS))
def test_vllm_fields_are_read(api: str) -> None:
    # A control on the parser: fields every vLLM release has, from both parts of the class.
    fields = vllm_fields(api)
    assert {"model", "n", "temperature", "stream", "top_k", "min_tokens", "cache_salt"} <= set(fields)
    assert "field_names" not in fields  # the base's ClassVar


@pytest.mark.parametrize("api", list(SECTIONS))
def test_every_vllm_parameter_has_a_row(api: str) -> None:
    missing = [name for name in vllm_fields(api) if name not in table(api)]
    assert not missing, f"docs/api.md ({api}) has no row for vLLM's {missing}"


@pytest.mark.parametrize("api", list(SECTIONS))
def test_every_phiserve_field_has_a_row(api: str) -> None:
    missing = [name for name in PHISERVE[api].model_fields if name not in table(api)]
    assert not missing, f"docs/api.md ({api}) has no row for phiserve's {missing}"


@pytest.mark.parametrize("api", list(SECTIONS))
def test_supported_rows_are_fields_of_the_request_model(api: str) -> None:
    rows = table(api)
    model = PHISERVE[api]
    wrong = [
        name for name, row in rows.items() if row["status"] == "supported" and name not in model.model_fields
    ]
    assert not wrong, f"docs/api.md ({api}) marks {wrong} supported, but {model.__name__} has no such field"
    unplaced = [
        name for name, row in rows.items() if row["status"] == "supported" and row["where"].strip() == "-"
    ]
    assert not unplaced, f"supported rows must say where the parameter goes: {unplaced}"


def _only_null(model: type[BaseModel], name: str) -> bool:
    return model.model_fields[name].annotation is NoneType


@pytest.mark.parametrize("api", list(SECTIONS))
def test_refused_rows_are_refused_by_the_request_model(api: str) -> None:
    """A refused field is not in the model (extra="forbid": a 400), or takes only null."""
    rows = table(api)
    model = PHISERVE[api]
    accepted = [
        name
        for name, row in rows.items()
        if row["status"] == "refused" and name in model.model_fields and not _only_null(model, name)
    ]
    assert not accepted, f"docs/api.md ({api}) marks {accepted} refused, but {model.__name__} accepts them"
    assert all(row["details"].strip() for row in rows.values() if row["status"] == "refused")


MINIMAL: dict[str, dict[str, Any]] = {
    "chat": {"model": "phi-3.5-mini", "messages": [{"role": "user", "content": "hi"}]},
    "completions": {"model": "phi-3.5-mini", "prompt": "hi"},
}


@pytest.mark.parametrize("api", list(SECTIONS))
def test_a_refused_field_is_a_400_naming_it(api: str) -> None:
    """What the doc promises a client: the error names the refused field (as `param`)."""
    model = PHISERVE[api]
    refused = [name for name, row in table(api).items() if row["status"] == "refused"]
    assert refused
    for name in refused:
        with pytest.raises(ValidationError) as caught:
            model.model_validate({**MINIMAL[api], name: "x"})
        status, body, _ = error_payload(invalid_request_from(caught.value.errors()))
        assert (status, body["error"]["type"], body["error"]["param"]) == (400, "invalid_request_error", name)
    model.model_validate(MINIMAL[api])  # the base request itself is accepted
