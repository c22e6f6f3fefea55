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
        (
            json.dumps({"custom_id": "x", "method": "GET", "url": "/v1/completions", "body": {"model": "m"}}),
            'method must be "POST"',
        ),
        (
            json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {}}),
            "body must be a JSON object with a model",
        ),
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


def test_deeply_nested_line_is_a_400_naming_the_line() -> None:
    # An attacker's line nested deeper than the JSON parser's recursion limit: a 400 that
    # names the line, never a RecursionError (500) (issue 9, item 9).
    deep = (
        '{"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": {"model": "m", "prompt": '
        + "[" * 100_000
        + "]" * 100_000
        + "}}"
    )
    with pytest.raises(InvalidRequest) as info:
        _check(_line("a") + "\n" + deep)
    assert "line 2" in info.value.message and "nested" in info.value.message


def test_nesting_below_the_parser_limit_is_refused_too() -> None:
    # Parsed, but would blow the stack later when the worker re-encodes it.
    body = {"model": "m", "prompt": "x", "extra": json.loads("[" * 900 + "]" * 900)}
    with pytest.raises(InvalidRequest, match="line 1: nested"):
        _check(json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/completions", "body": body}))


def test_raw_line_separator_inside_a_string_keeps_the_line_whole() -> None:
    # U+2028 / U+2029 / U+0085 are valid raw characters in a JSON string; only \n ends a line.
    text = "\n".join(
        json.dumps(
            {
                "custom_id": f"c{i}",
                "method": "POST",
                "url": "/v1/completions",
                "body": {"model": "m", "prompt": f"a{sep}b"},
            },
            ensure_ascii=False,
        )
        for i, sep in enumerate(["\u2028", "\u2029", "\x85", "\x1c"])
    )
    items = _check(text + "\r\n")
    assert [i["body"]["prompt"] for i in items] == ["a\u2028b", "a\u2029b", "a\x85b", "a\x1cb"]
