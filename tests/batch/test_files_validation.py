"""Batch input validation: every bad line is named with its number and the fix."""

from __future__ import annotations

import json

import pytest

from services.batch.files import validate_batch_jsonl
from services.errors import InvalidRequest


def _line(custom_id: str = "a", url: str = "/v1/chat/completions", **body: object) -> str:
    body = {"model": "phi-3.5-mini", "messages": [{"role": "user", "content": "hi"}], **body}
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def _check(text: str, max_lines: int = 100) -> list[dict]:  # type: ignore[type-arg]
    return validate_batch_jsonl(text.encode(), max_lines=max_lines)


def test_valid_file_with_trailing_newlines() -> None:
    items = _check(_line("a") + "\n" + _line("b") + "\n\n")
    assert [(i["line"], i["custom_id"]) for i in items] == [(1, "a"), (2, "b")]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        (_line("a") + "\n{not json", "line 2: not valid JSON"),
        (_line("a") + "\n" + _line("a"), "line 2: custom_id 'a' appears twice (first on line 1)"),
        (_line("a", url="/v1/embeddings"), "line 1: url must be one of"),
        (json.dumps({"custom_id": "x", "method": "GET", "url": "/v1/completions", "body": {"model": "m"}}), 'method must be "POST"'),
        (json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {}}), "body must be a JSON object with a model"),
        (json.dumps({"method": "POST"}), "custom_id must be a non-empty string"),
        ("[1, 2]", "must be a JSON object"),
        (_line("a", stream=True), "streaming is not available"),
        ("", "no lines"),
    ],
)
def test_bad_files_name_the_line(text: str, fragment: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        _check(text)
    assert fragment in info.value.message
    assert info.value.param == "file"


def test_line_limit_and_encoding() -> None:
    with pytest.raises(InvalidRequest, match="limit is 2"):
        _check("\n".join(_line(str(i)) for i in range(3)), max_lines=2)
    with pytest.raises(InvalidRequest, match="UTF-8"):
        validate_batch_jsonl(b"\xff\xfe", max_lines=10)


def test_many_errors_are_summarised() -> None:
    with pytest.raises(InvalidRequest, match=r"and 5 more"):
        _check("\n".join(["{"] * 10))
