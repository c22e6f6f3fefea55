"""The small endpoints SDKs call (issue 11, item 4), against the real cluster: the official
`openai` SDK where it has the call (`models.retrieve`, `files.list` with its filters), httpx
for /tokenize and /detokenize, whose counts must be the engine's own `usage.prompt_tokens`.
The attacker's side: another tenant learns nothing of models it may not use or of files it
does not own."""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from openai import OpenAI

from tests.conftest import Cluster

MINI = "phi-3.5-mini"
CHAT = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "Name a colour of the sky."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "And of grass?"},
]


def _tenant(admin: httpx.Client, **fields: Any) -> str:
    """A fresh tenant's key."""
    tenant_id = f"t-{uuid.uuid4().hex[:10]}"
    assert admin.post("/admin/tenants", json={"id": tenant_id, **fields}).status_code == 201
    created = admin.post(f"/admin/tenants/{tenant_id}/keys", json={"name": "endpoints"})
    assert created.status_code == 201, created.text
    key: str = created.json()["key"]
    return key


@pytest.fixture
def narrow_key(admin: httpx.Client) -> str:
    """A tenant that may use the vision model only."""
    return _tenant(admin, allowed_models=["phi-3.5-vision"])


@pytest.fixture
def sdk(cluster: Cluster) -> Iterator[Any]:
    """SDK clients by key, closed after the test."""
    made: list[OpenAI] = []

    def client(key: str) -> OpenAI:
        made.append(OpenAI(base_url=cluster.base_url, api_key=key, max_retries=0, timeout=120))
        return made[-1]

    yield client
    for one in made:
        one.close()


# -- GET /v1/models/{model} ---------------------------------------------------------------


def test_models_retrieve_returns_the_lists_entry(openai_client: OpenAI) -> None:
    listed = {m.id: m for m in openai_client.models.list()}
    for name in (MINI, "microsoft/Phi-3.5-mini-instruct", "phi-3.5-vision-instruct"):
        model = openai_client.models.retrieve(name)
        assert model.id == name and model.object == "model" and model.owned_by == "phiserve"
        assert model.model_dump() == listed[name].model_dump()
    with pytest.raises(openai.NotFoundError) as missing:
        openai_client.models.retrieve("gpt-4o")
    assert missing.value.code == "model_not_found"


def test_a_tenant_cannot_retrieve_or_list_a_model_it_may_not_use(
    cluster: Cluster, narrow_key: str, sdk: Any
) -> None:
    client = sdk(narrow_key)

    def not_found(name: str) -> dict[str, Any]:
        with pytest.raises(openai.NotFoundError) as refused:
            client.models.retrieve(name)
        body: dict[str, Any] = refused.value.response.json()
        body["error"]["message"] = body["error"]["message"].replace(name, "<name>")
        return body

    missing = not_found("no-such-model")
    assert not_found(MINI) == missing
    assert not_found("microsoft/Phi-3.5-MoE-instruct") == missing
    assert client.models.retrieve("phi-3.5-vision").id == "phi-3.5-vision"
    assert {m.id for m in client.models.list()} == {
        "phi-3.5-vision",
        "phi-3.5-vision-instruct",
        "microsoft/Phi-3.5-vision-instruct",
    }
    # No key: the tenant route answers 401 before it routes.
    assert httpx.get(f"{cluster.base_url}/models/{MINI}", timeout=30).status_code == 401


# -- /tokenize and /detokenize ------------------------------------------------------------


@pytest.mark.parametrize("model", [MINI, "phi-3.5-vision"])
def test_tokenize_counts_what_the_engine_reports(
    http: httpx.Client, openai_client: OpenAI, model: str
) -> None:
    counted = http.post("/tokenize", json={"model": model, "messages": CHAT})
    assert counted.status_code == 200, counted.text
    chat = openai_client.chat.completions.create(model=model, messages=CHAT, max_tokens=1)  # type: ignore[arg-type]
    assert chat.usage is not None
    assert counted.json()["count"] == chat.usage.prompt_tokens == len(counted.json()["tokens"])
    assert counted.json()["max_model_len"] == 2048

    prompt = "Once upon a time, in a land of tiny models,"
    counted = http.post("/v1/tokenize", json={"model": model, "prompt": prompt})
    assert counted.status_code == 200, counted.text
    completion = openai_client.completions.create(model=model, prompt=prompt, max_tokens=1)
    assert completion.usage is not None
    assert counted.json()["count"] == completion.usage.prompt_tokens
    # The same ids as a token prompt: the engine counts them the same.
    by_ids = openai_client.completions.create(model=model, prompt=counted.json()["tokens"], max_tokens=1)
    assert by_ids.usage is not None and by_ids.usage.prompt_tokens == counted.json()["count"]
    back = http.post("/detokenize", json={"model": model, "tokens": counted.json()["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": prompt}, back.text


def test_tokenize_refuses_bad_input_by_name(http: httpx.Client) -> None:
    for path, body, param in (
        ("/tokenize", {"model": MINI, "prompt": ""}, "prompt"),
        ("/tokenize", {"model": MINI, "prompt": "a", "messages": CHAT}, "prompt"),
        ("/detokenize", {"model": MINI, "tokens": [10**9]}, "tokens"),
        ("/detokenize", {"model": MINI, "tokens": []}, "tokens"),
    ):
        answer = http.post(path, json=body)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == param, answer.text
    unknown = http.post("/tokenize", json={"model": "gpt-4o", "prompt": "hi"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"


def test_tokenize_is_a_tenants_call(cluster: Cluster, narrow_key: str) -> None:
    body = {"model": MINI, "prompt": "hello"}
    assert httpx.post(f"{cluster.url}/tokenize", json=body, timeout=30).status_code == 401
    with httpx.Client(
        base_url=cluster.url, timeout=60, headers={"Authorization": f"Bearer {narrow_key}"}
    ) as b:
        for path, payload in (("/tokenize", body), ("/detokenize", {"model": MINI, "tokens": [1]})):
            refused = b.post(path, json=payload)
            assert refused.status_code == 403, refused.text
            assert refused.json()["error"]["code"] == "model_not_allowed"
        assert b.post("/tokenize", json={**body, "model": "phi-3.5-vision"}).status_code == 200


# -- GET /v1/files filters -----------------------------------------------------------------


def _upload(client: OpenAI, name: str) -> str:
    line = {
        "custom_id": name,
        "method": "POST",
        "url": "/v1/completions",
        "body": {"model": MINI, "prompt": "hi"},
    }
    return client.files.create(file=(name, io.BytesIO(json.dumps(line).encode())), purpose="batch").id


def test_files_list_filters_with_the_sdk(admin: httpx.Client, sdk: Any) -> None:
    client = sdk(_tenant(admin))
    ids = [_upload(client, f"f{i}.jsonl") for i in range(3)]
    newest = client.files.list()
    assert [f.id for f in newest.data] == ids[::-1] and newest.has_more is False
    first = client.files.list(order="asc", limit=2, purpose="batch")
    assert [f.id for f in first.data] == ids[:2] and first.has_more is True
    page = first.to_dict()  # OpenAI's list fields the SDK's page does not declare
    assert (page["first_id"], page["last_id"]) == (ids[0], ids[1])
    rest = client.files.list(order="asc", limit=2, after=ids[1])
    assert [f.id for f in rest.data] == ids[2:] and rest.has_more is False
    # The SDK's auto-pagination follows has_more and the last id.
    assert [f.id for f in client.files.list(order="asc", limit=1)] == ids
    assert client.files.list(purpose="batch_output").data == []
    with pytest.raises(openai.BadRequestError) as bad:
        client.files.list(order="sideways")  # type: ignore[arg-type]
    assert bad.value.param == "order"  # type: ignore[attr-defined]


def test_another_tenant_cannot_list_a_tenants_files_with_any_filter(admin: httpx.Client, sdk: Any) -> None:
    victim = sdk(_tenant(admin))
    secret = _upload(victim, "secret.jsonl")
    attacker = sdk(_tenant(admin))
    own = _upload(attacker, "own.jsonl")
    for filters in (
        {},
        {"order": "asc"},
        {"purpose": "batch"},
        {"limit": 10000},
        {"order": "desc", "limit": 1},
    ):
        assert [f.id for f in attacker.files.list(**filters)] == [own]
    errors = []
    for cursor in (secret, "file-000000000000000000000000"):
        with pytest.raises(openai.BadRequestError) as refused:
            attacker.files.list(after=cursor)
        errors.append(refused.value.response.json()["error"]["message"].replace(cursor, "<id>"))
    assert errors[0] == errors[1]
    with pytest.raises(openai.NotFoundError):
        attacker.files.retrieve(secret)
