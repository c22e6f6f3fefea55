"""gRPC answers are REST's typed bodies converted (services/grpc/responses.py), in-process.

The in-process gateway (tests/fakes/) serves REST; a gRPC server on the same core runs
beside it on a free port. The fake engine's text is deterministic (the words of the last
message), so the same request over both APIs must carry the same text, finish reason and
usage, and the stream's chunks must be the same deltas, with the role on the first only.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import pytest

from services.grpc.aio_client import AsyncClient
from services.grpc.client_common import user
from services.grpc.gen.phiserve.v1 import chat_pb2, common_pb2
from services.grpc.server import GrpcServer, start_grpc_server
from tests.fakes.gateway import InProcessGateway, sse_payloads

MODEL = "phi-3.5-mini"
WORDS = "the quick brown fox"
FINISH = {"stop": common_pb2.FINISH_REASON_STOP, "length": common_pb2.FINISH_REASON_LENGTH}


@pytest.fixture
async def grpc_client(inprocess_gateway: InProcessGateway) -> AsyncIterator[AsyncClient]:
    gw = inprocess_gateway
    server: GrpcServer = await start_grpc_server(gw.core, gw.batch_apis, gw.settings, address="127.0.0.1:0")
    client = AsyncClient(f"127.0.0.1:{server.port}", api_key=gw.api_key, timeout_s=10)
    try:
        yield client
    finally:
        await client.close()
        await server.stop(0)


def _usage(message: common_pb2.Usage) -> dict[str, object]:
    return {
        "prompt_tokens": message.prompt_tokens,
        "completion_tokens": message.completion_tokens,
        "total_tokens": message.total_tokens,
        "prompt_tokens_details": {"cached_tokens": message.prompt_tokens_details.cached_tokens},
    }


async def test_unary_chat_and_completion_match_rest(
    inprocess_gateway: InProcessGateway, grpc_client: AsyncClient
) -> None:
    gw = inprocess_gateway
    rest = await gw.client.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": WORDS}], "max_tokens": 3},
        headers=gw.auth,
    )
    assert rest.status_code == 200, rest.text
    body = rest.json()
    answer = await grpc_client.chat(MODEL, [user(WORDS)], max_tokens=3, request_id="grpc-unary-1")
    assert answer.request_id == "grpc-unary-1"
    assert answer.id.startswith("chatcmpl-") and answer.id != body["id"]
    assert answer.model == body["model"]
    [choice] = answer.choices
    assert choice.message.role == chat_pb2.ROLE_ASSISTANT
    assert choice.message.text == body["choices"][0]["message"]["content"] == " the quick brown"
    assert choice.finish_reason == FINISH[body["choices"][0]["finish_reason"]] == FINISH["length"]
    assert _usage(answer.usage) == body["usage"]

    rest = await gw.client.post(
        "/v1/completions", json={"model": MODEL, "prompt": WORDS, "echo": True}, headers=gw.auth
    )
    assert rest.status_code == 200, rest.text
    body = rest.json()
    completion = await grpc_client.complete(MODEL, WORDS, echo=True)
    assert completion.id.startswith("cmpl-")
    [choice] = completion.choices
    assert choice.text == body["choices"][0]["text"] == WORDS + " the quick brown fox"
    assert choice.finish_reason == FINISH[body["choices"][0]["finish_reason"]]
    assert _usage(completion.usage) == body["usage"]


async def test_streamed_chat_matches_rest_chunk_for_chunk(
    inprocess_gateway: InProcessGateway, grpc_client: AsyncClient
) -> None:
    gw = inprocess_gateway
    rest = await gw.client.post(
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": WORDS}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        headers=gw.auth,
    )
    assert rest.status_code == 200, rest.text
    *events, done = sse_payloads(rest.text)
    assert done == "[DONE]"
    chunks = [c async for c in grpc_client.chat_stream(MODEL, [user(WORDS)], include_usage=True)]
    assert len(chunks) == len(events)
    for i, (chunk, event) in enumerate(zip(chunks, events, strict=True)):
        assert chunk.id == chunks[0].id and chunk.model == event["model"]
        if not event["choices"]:  # the usage chunk
            assert not chunk.choices and _usage(chunk.usage) == event["usage"]
            continue
        assert not chunk.HasField("usage")
        [choice] = chunk.choices
        delta = event["choices"][0]["delta"]
        assert choice.delta.content == delta["content"]
        assert (choice.delta.role == chat_pb2.ROLE_ASSISTANT) == ("role" in delta) == (i == 0)
        reason = event["choices"][0]["finish_reason"]
        assert choice.finish_reason == (FINISH[reason] if reason else common_pb2.FINISH_REASON_UNSPECIFIED)


async def test_streamed_completion_matches_rest(
    inprocess_gateway: InProcessGateway, grpc_client: AsyncClient
) -> None:
    gw = inprocess_gateway
    rest = await gw.client.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": WORDS, "stream": True, "stream_options": {"include_usage": True}},
        headers=gw.auth,
    )
    *events, _ = sse_payloads(rest.text)
    chunks = [c async for c in grpc_client.complete_stream(MODEL, WORDS, include_usage=True)]
    texts = ["".join(choice.text for choice in chunk.choices) for chunk in chunks]
    assert texts == ["".join(c["text"] for c in event["choices"]) for event in events]
    assert _usage(chunks[-1].usage) == events[-1]["usage"]


async def test_model_list_matches_rest(inprocess_gateway: InProcessGateway, grpc_client: AsyncClient) -> None:
    rest = (await inprocess_gateway.client.get("/v1/models")).json()["data"]
    models = await grpc_client.list_models()
    assert [m.id for m in models] == [entry["id"] for entry in rest]
    assert [(m.root, m.pool, m.max_model_len, m.created) for m in models] == [
        (e["root"], e["pool"], e["max_model_len"], e["created"]) for e in rest
    ]


async def test_n_choices_and_logprobs_match_rest(
    inprocess_gateway: InProcessGateway, grpc_client: AsyncClient
) -> None:
    gw = inprocess_gateway
    body = {"model": MODEL, "messages": [{"role": "user", "content": WORDS}], "max_tokens": 3, "n": 2}
    rest = await gw.client.post(
        "/v1/chat/completions", json={**body, "logprobs": True, "top_logprobs": 1}, headers=gw.auth
    )
    assert rest.status_code == 200, rest.text
    expected = rest.json()["choices"]
    answer = await grpc_client.chat(MODEL, [user(WORDS)], max_tokens=3, n=2, logprobs=True, top_logprobs=1)
    assert [c.index for c in answer.choices] == [c["index"] for c in expected] == [0, 1]
    for choice, rest_choice in zip(answer.choices, expected, strict=True):
        assert choice.message.text == rest_choice["message"]["content"]
        got = [(t.token, t.logprob, [top.token for top in t.top_logprobs]) for t in choice.logprobs.content]
        assert got == [
            (t["token"], t["logprob"], [top["token"] for top in t["top_logprobs"]])
            for t in rest_choice["logprobs"]["content"]
        ]
    plain = await grpc_client.chat(MODEL, [user(WORDS)], max_tokens=3)
    assert not plain.choices[0].HasField("logprobs")


async def test_files_list_and_delete_match_rest(
    inprocess_gateway: InProcessGateway, grpc_client: AsyncClient
) -> None:
    gw = inprocess_gateway
    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": MODEL, "prompt": "x"},
    }
    data = (json.dumps(line) + "\n").encode()
    ids = [(await grpc_client.upload_file(data, filename=f"{i}.jsonl")).id for i in range(3)]
    for order in ("asc", "desc"):
        rest = (await gw.client.get(f"/v1/files?order={order}&limit=2", headers=gw.auth)).json()
        page = await grpc_client.list_files(order=order, limit=2)
        assert [f.id for f in page.files] == [f["id"] for f in rest["data"]]
        assert (page.first_id, page.last_id, page.has_more) == (
            rest["first_id"],
            rest["last_id"],
            rest["has_more"],
        )
    assert [f.id for f in (await grpc_client.list_files(order="asc")).files] == ids

    deleted = await grpc_client.delete_file(ids[0])
    assert deleted.deleted and deleted.id == ids[0]
    assert (await gw.client.get(f"/v1/files/{ids[0]}", headers=gw.auth)).status_code == 404
    model = await grpc_client.get_model(MODEL)
    rest_model = (await gw.client.get("/v1/models")).json()["data"]
    assert (
        model.id == MODEL
        and model.max_model_len == next(m for m in rest_model if m["id"] == MODEL)["max_model_len"]
    )
