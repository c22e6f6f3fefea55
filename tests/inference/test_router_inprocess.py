"""The pool router over fake Serve handles and real pool replicas (issue 10, item 6): the one
handle hop, its Ray/Serve error translation and its cancellation, without Ray."""

from __future__ import annotations

import asyncio
import time

import pytest
from ray.exceptions import RayActorError
from ray.serve._private.common import DeploymentID
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

from services.catalog.loader import load_catalog
from services.errors import (
    ContextLengthExceeded,
    GenerationFailed,
    InvalidRequest,
    ModelNotFound,
    NoLiveReplica,
    PhiserveError,
    ServiceUnavailable,
)
from services.inference.errors import error_payload
from services.inference.router import PoolRouter
from services.pools.engine import ChatMessage, GenerationRequest, GenerationResult, SamplingOptions
from tests.fakes.engine import image_bytes
from tests.fakes.handles import FakePools, start_fake_pools

ASSIGN_TIMEOUT_S = 0.3


async def _router() -> tuple[PoolRouter, FakePools]:
    catalog = load_catalog("local")
    pools = await start_fake_pools(catalog)
    return PoolRouter(catalog, pools.handles, assign_timeout_s=ASSIGN_TIMEOUT_S), pools


def _request(text: str = "one two three", **sampling: object) -> GenerationRequest:
    return GenerationRequest(
        request_id="client-id",
        model="phi-3.5-mini",
        sampling=SamplingOptions(**sampling),  # type: ignore[arg-type]
        messages=(ChatMessage(role="user", text=text),),
    )


async def _until(predicate: object, timeout_s: float = 3.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_an_unknown_model_is_404_model_not_found() -> None:
    router, _ = await _router()
    with pytest.raises(ModelNotFound) as caught:
        router.resolve("gpt-4o")
    assert error_payload(caught.value)[0] == 404
    assert caught.value.param == "model"
    # Served names and aliases resolve to their pool.
    assert router.resolve("microsoft/Phi-3.5-MoE-instruct").name == "moe"


async def test_generate_and_stream_cross_the_hop() -> None:
    router, pools = await _router()
    text = router.resolve("phi-3.5-mini")
    result = await router.generate(text, _request())
    assert isinstance(result, GenerationResult)
    assert (result.text, result.finish_reason, result.completion_tokens) == (" one two three", "stop", 3)
    chunks = [chunk async for chunk in router.stream(text, _request(max_tokens=2))]
    assert "".join(c.text for c in chunks) == " one two"
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].completion_tokens == 2
    # Each call reached the engine as a copy (pickled), with a fresh engine request id.
    engine = pools.engines["text"]
    assert len(engine.finished) == 2 and len(set(engine.finished)) == 2
    assert engine.requests[0] is not engine.requests[1]
    assert pools.handles["text"].calls == ["generate", "generate_stream"]


# Whether nothing ran (NoLiveReplica: a batch item waits without spending a try) matters
# to the batch worker; the client sees the same 503 either way.
SERVE_ERRORS = [
    ("assignment", BackPressureError(num_queued_requests=1, max_queued_requests=1), "overloaded", False),
    ("assignment", DeploymentUnavailableError(DeploymentID(name="pool-text")), "no_live_replica", True),
    ("call", RayActorError(), "no_live_replica", False),
]


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
@pytest.mark.parametrize(
    ("where", "error", "code", "nothing_ran"), SERVE_ERRORS, ids=lambda v: type(v).__name__
)
async def test_serve_errors_become_service_unavailable(
    where: str, error: BaseException, code: str, nothing_ran: bool, stream: bool
) -> None:
    router, pools = await _router()
    handle = pools.handles["text"]
    (handle.fail_assignment if where == "assignment" else handle.fail_calls)(error)
    text = router.resolve("phi-3.5-mini")
    with pytest.raises(ServiceUnavailable) as caught:
        if stream:
            [chunk async for chunk in router.stream(text, _request())]
        else:
            await router.generate(text, _request())
    assert caught.value.code == code
    assert isinstance(caught.value, NoLiveReplica) is nothing_ran
    status, _, headers = error_payload(caught.value)
    assert (status, headers["Retry-After"]) == (503, "5")
    assert not pools.engines["text"].requests


async def test_a_pool_without_a_replica_is_503_after_the_assign_timeout() -> None:
    router, pools = await _router()
    pools.handles["vision"].replicas.clear()
    vision = router.resolve("phi-3.5-vision")
    started = time.monotonic()
    with pytest.raises(ServiceUnavailable) as caught:
        await router.generate(vision, _request())
    assert caught.value.code == "no_live_replica" and isinstance(caught.value, NoLiveReplica)
    assert ASSIGN_TIMEOUT_S <= time.monotonic() - started < ASSIGN_TIMEOUT_S + 2
    assert await router.ready(vision) is False
    assert await router.ready(router.resolve("phi-3.5-mini")) is True


@pytest.mark.parametrize("stream", [False, True], ids=["unary", "stream"])
async def test_the_engines_own_errors_arrive_as_themselves(stream: bool) -> None:
    router, pools = await _router()
    text = router.resolve("phi-3.5-mini")
    cases: list[tuple[GenerationRequest, type[PhiserveError]]] = [
        (_request(max_tokens=5000), ContextLengthExceeded),  # refused before any output
        (
            GenerationRequest(
                "r",
                "phi-3.5-mini",
                SamplingOptions(),
                messages=(ChatMessage("user", "look", image_count=1),),
                images=(image_bytes(),),
            ),
            InvalidRequest,  # an image to a text model
        ),
    ]
    for request, expected in cases:
        with pytest.raises(expected) as caught:
            if stream:
                [chunk async for chunk in router.stream(text, request)]
            else:
                await router.generate(text, request)
        # Unwrapped from Ray's RayTaskError: the error table sees the phiserve type.
        assert type(caught.value) is expected
    pools.engines["text"].fail_after_tokens = 0
    with pytest.raises(GenerationFailed):
        if stream:
            [chunk async for chunk in router.stream(text, _request())]
        else:
            await router.generate(text, _request())


async def test_a_stream_failing_midway_delivers_what_came_first() -> None:
    router, pools = await _router()
    pools.engines["text"].fail_after_tokens = 1
    received = []
    with pytest.raises(GenerationFailed):
        async for chunk in router.stream(router.resolve("phi-3.5-mini"), _request()):
            received.append(chunk.text)
    assert received == [" one"]


async def test_a_stream_left_early_aborts_the_engine_request() -> None:
    router, pools = await _router()
    engine = pools.engines["text"]
    engine.token_delay_s = 0.01
    stream = router.stream(router.resolve("phi-3.5-mini"), _request(" ".join(["word"] * 500)))
    first = await anext(stream)
    assert first.text == " word"
    await stream.aclose()  # type: ignore[attr-defined]
    await _until(lambda: engine.aborted)
    assert engine.running == 0 and not engine.finished


async def test_a_unary_call_cancelled_aborts_the_engine_request() -> None:
    router, pools = await _router()
    engine = pools.engines["text"]
    engine.pause()
    call = asyncio.ensure_future(router.generate(router.resolve("phi-3.5-mini"), _request()))
    await _until(lambda: engine.running == 1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    # Outside Serve the router must cancel the remote call itself, or it runs on.
    await _until(lambda: engine.aborted)
    assert engine.running == 0 and not engine.finished


async def test_a_call_cancelled_before_assignment_never_runs() -> None:
    """The caller left while the pool had no replica: its call is withdrawn, so a replica
    that comes up later does not run it for nobody (outside a Serve request, e.g. gRPC)."""
    router, pools = await _router()
    handle = pools.handles["text"]
    replica = handle.replicas.pop()
    call = asyncio.ensure_future(router.generate(router.resolve("phi-3.5-mini"), _request()))
    await _until(lambda: handle.calls == ["generate"])
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    handle.add_replica(replica)
    result = await router.generate(router.resolve("phi-3.5-mini"), _request("four five"))
    assert result.text == " four five"
    assert len(pools.engines["text"].requests) == 1  # the second call only
