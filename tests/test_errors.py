"""The exception hierarchy: every error survives the Ray handle (pickle) intact."""

from __future__ import annotations

import inspect
import pickle

import pytest

from services import errors
from services.errors import PhiserveError, ServiceUnavailable

ALL_ERRORS = [obj for _, obj in inspect.getmembers(errors, inspect.isclass) if issubclass(obj, PhiserveError)]


def test_public_surface_lists_every_error() -> None:
    assert sorted(errors.__all__) == sorted(cls.__name__ for cls in ALL_ERRORS)


@pytest.mark.parametrize("cls", ALL_ERRORS)
def test_errors_pickle_with_their_fields(cls: type[PhiserveError]) -> None:
    exc = cls("boom", param="messages[0]", code="custom", retry_after_s=7, headers={"x-a": "1"})
    copy = pickle.loads(pickle.dumps(exc))
    assert type(copy) is cls
    assert (copy.message, copy.param, copy.code, copy.retry_after_s) == ("boom", "messages[0]", "custom", 7)
    assert copy.headers == {"x-a": "1"}
    assert str(copy) == "boom"


def test_default_codes_and_retry_after() -> None:
    assert errors.ModelNotFound("x").code == "model_not_found"
    assert errors.ContextLengthExceeded("x").code == "context_length_exceeded"
    assert ServiceUnavailable("x").retry_after_s == 5
    assert errors.InvalidRequest("x").retry_after_s is None
