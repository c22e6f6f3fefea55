"""The gRPC API against the real cluster: chat (text, MoE, vision), completions, models,
parity with REST, request ids, health and reflection."""

from __future__ import annotations

import base64

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from openai import OpenAI

from services.grpc.client import AsyncClient, Client, image, system, user
from services.grpc.gen.phiserve.v1 import chat_pb2, common_pb2, models_pb2
from services.grpc.servicer import SERVICE_NAME
from tests.conftest import DEMO_KEY, Cluster
from tests.grpc.conftest import grpc_target
from tests.grpc.test_schema import BATCH_METHODS, INFERENCE_METHODS
from tests.helpers import png_data_url

STOP, LENGTH = common_pb2.FINISH_REASON_STOP, common_pb2.FINISH_REASON_LENGTH


def _png() -> bytes:
    return base64.b64decode(png_data_url(320, 240).split(",", 1)[1])


@pytest.mark.parametrize("model", ["phi-3.5-mini", "phi-3.5-moe"])
def test_unary_and_streaming_chat(grpc_client: Client, model: str) -> None:
    messages = [system("Be brief."), user("Hello there")]
    whole = grpc_client.chat(model, messages, max_tokens=12, temperature=0, ignore_eos=True)
    assert whole.model == model and whole.id.startswith("chatcmpl-") and whole.request_id not in whole.id
    choice = whole.choices[0]
    assert choice.message.role == chat_pb2.ROLE_ASSISTANT
    assert choice.finish_reason == LENGTH
    assert whole.usage.completion_tokens == 12 and whole.usage.prompt_tokens > 5
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens

    chunks = list(
        grpc_client.chat_stream(
            model, messages, max_tokens=12, temperature=0, ignore_eos=True, include_usage=True
        )
    )
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == chat_pb2.ROLE_ASSISTANT
    assert all(c.choices[0].delta.role == chat_pb2.ROLE_UNSPECIFIED for c in content[1:])
    assert content[-1].choices[0].finish_reason == LENGTH
    assert all(c.choices[0].finish_reason == common_pb2.FINISH_REASON_UNSPECIFIED for c in content[:-1])
    assert not chunks[-1].choices and chunks[-1].HasField("usage")
    assert chunks[-1].usage == whole.usage
    assert len({c.id for c in chunks}) == 1
    assert "".join(c.choices[0].delta.content for c in content) == choice.message.text


def test_vision_chat_with_bytes_and_data_url(grpc_client: Client) -> None:
    png = _png()
    with_bytes = grpc_client.chat(
        "phi-3.5-vision", [user("What is in this picture?", png)], max_tokens=8, temperature=0
    )
    with_url = grpc_client.chat(
        "phi-3.5-vision",
        [user("What is in this picture?", image(png_data_url(320, 240)))],
        max_tokens=8,
        temperature=0,
    )
    text_only = grpc_client.chat(
        "phi-3.5-vision", [user("What is in this picture?")], max_tokens=8, temperature=0
    )
    # The image became hundreds of prompt tokens (HD transform), the same either way.
    assert with_bytes.usage.prompt_tokens > text_only.usage.prompt_tokens + 100
    # Counted the same; the second request may find the first's image tokens in the tenant's
    # prefix cache (reported as cached_tokens), so usage is compared without them.
    assert (with_bytes.usage.prompt_tokens, with_bytes.usage.completion_tokens) == (
        with_url.usage.prompt_tokens,
        with_url.usage.completion_tokens,
    )
    assert with_bytes.choices[0].message.text == with_url.choices[0].message.text
    streamed = grpc_client.chat_stream(
        "phi-3.5-vision", [user("What is in this picture?", png)], max_tokens=8, temperature=0
    )
    assert (
        "".join(c.choices[0].delta.content for c in streamed if c.choices)
        == with_bytes.choices[0].message.text
    )


def test_parity_with_rest(grpc_client: Client, openai_client: OpenAI) -> None:
    """Same request, greedy: the same text, finish reason and usage over both APIs."""
    for model in ("phi-3.5-mini", "phi-3.5-moe"):
        rest = openai_client.chat.completions.create(
            model=model,
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Tell me a story"},
            ],
            max_tokens=24,
            temperature=0,
        )
        rpc = grpc_client.chat(
            model, [system("Be brief."), user("Tell me a story")], max_tokens=24, temperature=0
        )
        assert rpc.choices[0].message.text == rest.choices[0].message.content
        assert {STOP: "stop", LENGTH: "length"}[rpc.choices[0].finish_reason] == rest.choices[0].finish_reason
        assert (rpc.usage.prompt_tokens, rpc.usage.completion_tokens) == (
            rest.usage.prompt_tokens,
            rest.usage.completion_tokens,
        )
    rest_stream = openai_client.completions.create(
        model="phi-3.5-mini",
        prompt="def fibonacci(n):",
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    rest_chunks = list(rest_stream)
    rpc_chunks = list(
        grpc_client.complete_stream(
            "phi-3.5-mini",
            "def fibonacci(n):",
            max_tokens=10,
            temperature=0,
            ignore_eos=True,
            include_usage=True,
        )
    )
    assert "".join(c.choices[0].text for c in rpc_chunks if c.choices) == "".join(
        c.choices[0].text for c in rest_chunks if c.choices
    )
    assert rpc_chunks[-1].usage.completion_tokens == rest_chunks[-1].usage.completion_tokens == 10
    assert rpc_chunks[-1].usage.prompt_tokens == rest_chunks[-1].usage.prompt_tokens


def test_completions_and_echo(grpc_client: Client) -> None:
    plain = grpc_client.complete(
        "phi-3.5-mini", "def fibonacci(n):", max_tokens=10, temperature=0, ignore_eos=True
    )
    assert plain.id.startswith("cmpl-") and plain.request_id not in plain.id
    assert plain.choices[0].finish_reason == LENGTH and plain.usage.completion_tokens == 10
    echoed = grpc_client.complete(
        "phi-3.5-mini", "def fibonacci(n):", echo=True, max_tokens=10, temperature=0, ignore_eos=True
    )
    assert echoed.choices[0].text == "def fibonacci(n):" + plain.choices[0].text
    stop = grpc_client.complete("phi-3.5-mini", "abc", max_tokens=30, temperature=0, stop=["e", "a"])
    assert "e" not in stop.choices[0].text and "a" not in stop.choices[0].text


def test_list_models_matches_rest(grpc_client: Client, openai_client: OpenAI) -> None:
    public = {m.id for m in Client(channel=grpc_client._channel).list_models()}  # no key needed
    models = {m.id: m for m in grpc_client.list_models()}  # the demo tenant's, adapters included
    rest = {m.id: m.model_extra for m in openai_client.models.list()}
    assert set(models) == set(rest)
    assert public == {name for name in rest if not name.startswith("ft:")}
    for name, entry in rest.items():
        assert models[name].max_model_len == entry["max_model_len"]
        assert models[name].pool == entry["pool"]
        assert (
            models[name].modality
            == {"text": models_pb2.MODALITY_TEXT, "vision": models_pb2.MODALITY_VISION}[entry["modality"]]
        )


def test_request_id_is_echoed_or_generated(grpc_channel: grpc.Channel) -> None:
    from services.grpc.gen.phiserve.v1 import inference_service_pb2 as pb
    from services.grpc.gen.phiserve.v1 import inference_service_pb2_grpc as pb_grpc

    stub = pb_grpc.InferenceServiceStub(grpc_channel)
    request = pb.CompleteRequest(
        model="phi-3.5-mini", prompt="hi", sampling=common_pb2.SamplingParams(max_tokens=2)
    )
    metadata = (("authorization", f"Bearer {DEMO_KEY}"), ("x-request-id", "trace-abc.123"))
    response, call = stub.Complete.with_call(request, metadata=metadata, timeout=60)
    initial = dict(call.initial_metadata())
    assert response.request_id == "trace-abc.123" == initial["x-request-id"]
    generated, call = stub.Complete.with_call(
        request, metadata=(("authorization", f"Bearer {DEMO_KEY}"), ("x-request-id", "bad id!")), timeout=60
    )
    assert len(generated.request_id) >= 16 and generated.request_id != "bad id!"


async def test_async_client_streams(cluster: Cluster) -> None:
    async with AsyncClient(grpc_target(cluster), api_key=DEMO_KEY, timeout_s=120) as client:
        chunks = [
            c
            async for c in client.chat_stream(
                "phi-3.5-moe", [user("Stream!")], max_tokens=8, ignore_eos=True, include_usage=True
            )
        ]
        assert chunks[-1].usage.completion_tokens == 8
        whole = await client.complete("phi-3.5-mini", "Once", max_tokens=4, ignore_eos=True)
        assert whole.usage.completion_tokens == 4
        assert {m.id for m in await client.list_models()} >= {"phi-3.5-mini", "phi-3.5-moe", "phi-3.5-vision"}


def test_health(grpc_channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(grpc_channel)
    for service in ("", SERVICE_NAME):
        answer = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert answer.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=10)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=10)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


def test_reflection_lists_and_describes_the_service(grpc_channel: grpc.Channel) -> None:
    from google.protobuf import descriptor_pb2

    stub = reflection_pb2_grpc.ServerReflectionStub(grpc_channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol=SERVICE_NAME),
    ]
    listing, described = list(stub.ServerReflectionInfo(iter(requests), timeout=10))
    names = {s.name for s in listing.list_services_response.service}
    assert {SERVICE_NAME, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= names
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in described.file_descriptor_response.file_descriptor_proto
    ]
    service = next(s for f in files if f.name == "phiserve/v1/inference_service.proto" for s in f.service)
    assert [m.name for m in service.method] == [*INFERENCE_METHODS, *BATCH_METHODS]
    # The batch messages come along as a dependency, so a reflecting client can decode them.
    assert "phiserve/v1/batch.proto" in {f.name for f in files}


def test_readme_grpc_examples_run(
    cluster: Cluster,
    grpc_channel: grpc.Channel,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The README's gRPC section's Python blocks (typed client; reflection) run as shown."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("\n## gRPC\n", 1)[1].split("\n## ", 1)[0]
    blocks = [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]
    assert len(blocks) == 3  # typed client; reflection; the Batch API
    monkeypatch.setenv("PHISERVE_GRPC_TARGET", grpc_target(cluster))
    monkeypatch.setenv("PHISERVE_API_KEY", DEMO_KEY)
    for block in blocks:
        exec(compile(block, "README.md#grpc", "exec"), {})  # noqa: S102
    out = capsys.readouterr().out
    assert "completion_tokens: 16" in out  # the streamed usage
    assert '{"ok":' in out  # the json_schema answer
    assert "BATCH_STATUS_COMPLETED 3 of 3" in out  # the batch ran; its answers were read
    assert all(f"\nq{i} " in out for i in range(3))
    # Reflection listed the services as the README's comment says.
    listed = next(line for line in section.splitlines() if "get_services()" in line).split("# ", 1)[1]
    assert listed in out
