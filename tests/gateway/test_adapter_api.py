"""Adapters over the API (issue 14), in-process (the real gateway app and core over real
Redis; fake pools, as nothing here generates): the admin routes that register, list and
delete them, and the tenant-facing /v1/models that shows a tenant its own adapters.

From the attacker's side: tenant B cannot list, retrieve or delete tenant A's adapter, and
gets the very 404 body a made-up model gets, over REST, the OpenAI SDK and gRPC; a tenant
key cannot use the admin routes; a source outside the adapter store is refused.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from openai import AsyncOpenAI, NotFoundError

from services.grpc.aio_client import AsyncClient
from services.grpc.client_common import PhiserveRpcError
from services.grpc.server import start_grpc_server
from services.local.redis_server import LocalRedis
from services.tenancy.models import Tenant
from tests.conftest import inprocess_redis_url
from tests.fakes.gateway import BASE_URL, InProcessGateway, run_inprocess_gateway
from tests.lora_files import lora_tensors, write_adapter

A_ID = "ft:phi-3.5-mini:acme:support"
REGISTER = "/admin/tenants/acme/adapters"


@pytest.fixture
async def gw(redis_server: LocalRedis, tmp_path: Path) -> AsyncIterator[InProcessGateway]:
    store = tmp_path / "store"
    write_adapter(store / "support", seed=1)
    write_adapter(store / "other", seed=2)
    (tmp_path / "outside").mkdir()
    write_adapter(tmp_path / "outside" / "secret")
    async with run_inprocess_gateway(
        inprocess_redis_url(redis_server), tmp_path, adapters_dir=store
    ) as gateway:
        yield gateway


async def register(
    gw: InProcessGateway, name: str = "support", source: str = "support", tenant: str = "acme"
) -> httpx.Response:
    return await gw.client.post(
        f"/admin/tenants/{tenant}/adapters",
        json={"name": name, "base_model": "phi-3.5-mini", "source": source},
        headers=gw.admin,
    )


async def tenant_b(gw: InProcessGateway) -> dict[str, str]:
    key = await gw.add_tenant(Tenant(id="globex", name="Globex"))
    return {"Authorization": f"Bearer {key}"}


def not_found(model: str) -> dict[str, Any]:
    return {
        "error": {
            "message": f"The model '{model}' does not exist",
            "type": "invalid_request_error",
            "param": "model",
            "code": "model_not_found",
        }
    }


async def test_admin_registers_lists_and_deletes(gw: InProcessGateway) -> None:
    created = await register(gw)
    assert created.status_code == 201, created.text
    record = created.json()
    assert record["id"] == A_ID and record["object"] == "adapter"
    assert (record["tenant_id"], record["base_model"], record["rank"]) == ("acme", "phi-3.5-mini", 8)
    listed = await gw.client.get(REGISTER, headers=gw.admin)
    assert listed.status_code == 200 and listed.json() == {"object": "list", "data": [record]}
    deleted = await gw.client.delete(f"{REGISTER}/support", headers=gw.admin)
    assert deleted.status_code == 200 and deleted.json() == record
    again = await gw.client.delete(f"{REGISTER}/support", headers=gw.admin)
    assert again.status_code == 404 and again.json()["error"]["code"] == "adapter_not_found"


async def test_admin_errors_are_typed_4xx(gw: InProcessGateway) -> None:
    assert (await register(gw)).status_code == 201
    cases = {
        "duplicate": (await register(gw), 400, "adapter_exists", "name"),
        "escape": (
            await register(gw, name="x", source="../outside/secret"),
            400,
            "invalid_adapter_source",
            "source",
        ),
        "absolute": (
            await register(gw, name="y", source=str(gw.settings.cache_dir)),
            400,
            "invalid_adapter_source",
            "source",
        ),
        "missing": (await register(gw, name="z", source="nope"), 400, "invalid_adapter", "source"),
        "tenant": (await register(gw, tenant="ghost"), 404, "not_found", "tenant_id"),
    }
    for case, (answer, status, code, param) in cases.items():
        assert answer.status_code == status, (case, answer.text)
        assert answer.json()["error"]["code"] == code, case
        assert answer.json()["error"]["param"] == param, case
    bad_name = await gw.client.post(
        REGISTER, json={"name": "Bad:Name", "base_model": "phi-3.5-mini", "source": "x"}, headers=gw.admin
    )
    assert bad_name.status_code == 400 and bad_name.json()["error"]["type"] == "invalid_request_error"
    not_json = await gw.client.post(
        REGISTER, content=b"{", headers={**gw.admin, "content-type": "application/json"}
    )
    assert not_json.status_code == 400
    moe = await gw.client.post(
        REGISTER, json={"name": "m", "base_model": "phi-3.5-moe", "source": "support"}, headers=gw.admin
    )
    assert moe.status_code == 400 and moe.json()["error"]["code"] == "model_not_lora"


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"name": "a", "base_model": "phi-3.5-mini"},
        {"name": "a", "base_model": "phi-3.5-mini", "source": None},
        {"name": "a", "base_model": "phi-3.5-mini", "source": 7},
        {"name": "a", "base_model": "phi-3.5-mini", "source": ["support"]},
        {"name": "a", "base_model": "phi-3.5-mini", "source": ""},
        {"name": "a", "base_model": "phi-3.5-mini", "source": "x" * 4097},
        {"name": "a", "base_model": "phi-3.5-mini", "source": "support", "rank": 0},
        {"name": "a", "base_model": "phi-3.5-mini", "source": "support", "rank": 8.5},
        {"name": "a", "base_model": "phi-3.5-mini", "source": "support", "path": "/etc"},
        {"name": "a", "base_model": ["phi-3.5-mini"], "source": "support"},
        {"name": "a" * 64, "base_model": "phi-3.5-mini", "source": "support"},
        {"name": "a", "base_model": "phi-3.5-mini", "source": "x" * 4000},  # ENAMETOOLONG was a 500
        {"name": "a", "base_model": "phi-3.5-mini", "source": "/".join(["d"] * 2000)},
        {"name": "a", "base_model": "", "source": "support"},
        {"name": "a", "base_model": "phi-3.5-mini", "source": "support/adapter_config.json"},
        {"name": "a", "base_model": "phi-3.5-mini", "source": "file:///"},
        {"name": "a", "base_model": "phi-3.5-mini", "source": "file://%00/x"},
    ],
)
async def test_malformed_registrations_are_400s(gw: InProcessGateway, body: dict[str, Any]) -> None:
    answer = await gw.client.post(REGISTER, json=body, headers=gw.admin)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["type"] == "invalid_request_error"
    assert await gw.core.adapters.list("acme") == []


async def test_a_tenant_key_cannot_use_the_admin_routes(gw: InProcessGateway) -> None:
    for answer in (
        await gw.client.post(
            REGISTER, json={"name": "a", "base_model": "phi-3.5-mini", "source": "support"}, headers=gw.auth
        ),
        await gw.client.get(REGISTER, headers=gw.auth),
        await gw.client.delete(f"{REGISTER}/support", headers=gw.auth),
    ):
        assert answer.status_code == 403 and answer.json()["error"]["code"] == "admin_only"
    assert await gw.core.adapters.list("acme") == []


async def test_an_invalid_adapter_is_a_400_that_says_why(gw: InProcessGateway, tmp_path: Path) -> None:
    tensors = lora_tensors()
    tensors["base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight"][2, 3] = float("nan")
    write_adapter(tmp_path / "store" / "nan", tensors=tensors)
    answer = await register(gw, name="nan", source="nan")
    assert answer.status_code == 400
    assert answer.json()["error"] == {
        "message": "adapter_model.safetensors: tensor base_model.model.model.layers.1.self_attn.o_proj.lora_A.weight "
        "holds NaN or infinite values",
        "type": "invalid_request_error",
        "param": "source",
        "code": "invalid_adapter",
    }


async def test_a_tenant_sees_its_own_adapters_and_no_one_elses(gw: InProcessGateway) -> None:
    b = await tenant_b(gw)
    assert (await register(gw)).status_code == 201
    assert (await register(gw, name="mine", source="other", tenant="globex")).status_code == 201

    a_list = (await gw.client.get("/v1/models", headers=gw.auth)).json()["data"]
    [entry] = [m for m in a_list if m["id"].startswith("ft:")]
    assert entry == {
        "id": A_ID,
        "object": "model",
        "created": entry["created"],
        "owned_by": "acme",
        "root": "phi-3.5-mini",
        "parent": "phi-3.5-mini",
        "pool": "text",
        "modality": "text",
        "max_model_len": 2048,
        "max_images_per_request": 0,
    }
    assert entry["created"] > 0
    retrieved = await gw.client.get(f"/v1/models/{A_ID}", headers=gw.auth)
    assert retrieved.status_code == 200 and retrieved.json() == entry

    b_ids = {m["id"] for m in (await gw.client.get("/v1/models", headers=b)).json()["data"]}
    assert A_ID not in b_ids and "ft:phi-3.5-mini:globex:mine" in b_ids
    public = {m["id"] for m in (await gw.client.get("/v1/models")).json()["data"]}
    assert not any(name.startswith("ft:") for name in public)


async def test_b_gets_for_a_s_adapter_the_404_of_a_made_up_model(gw: InProcessGateway) -> None:
    b = await tenant_b(gw)
    assert (await register(gw)).status_code == 201
    made_up = "ft:phi-3.5-mini:acme:no-such-adapter"
    for model in (A_ID, made_up, "ft:phi-3.5-mini:globex:support", "gpt-4o"):
        answer = await gw.client.get(f"/v1/models/{model}", headers=b)
        assert (answer.status_code, answer.json()) == (404, not_found(model)), model
        deleted = await gw.client.delete(f"/v1/models/{model}", headers=b)
        assert (deleted.status_code, deleted.json()) == (404, not_found(model)), model
    # A's adapter is untouched and A still reaches it.
    assert [r.id for r in await gw.core.adapters.list("acme")] == [A_ID]
    assert (await gw.client.get(f"/v1/models/{A_ID}", headers=gw.auth)).status_code == 200


async def test_the_owner_deletes_its_adapter_with_the_openai_sdk(gw: InProcessGateway) -> None:
    assert (await register(gw)).status_code == 201
    client = AsyncOpenAI(base_url=f"{BASE_URL}/v1", api_key=gw.api_key, http_client=gw.client, max_retries=0)
    assert A_ID in {m.id async for m in client.models.list()}
    model = await client.models.retrieve(A_ID)
    assert (model.owned_by, model.model_extra) == (
        "acme",
        {**(model.model_extra or {}), "parent": "phi-3.5-mini"},
    )
    deleted = await client.models.delete(A_ID)
    assert (deleted.id, deleted.object, deleted.deleted) == (A_ID, "model", True)
    with pytest.raises(NotFoundError):
        await client.models.retrieve(A_ID)
    assert A_ID not in {m.id async for m in client.models.list()}
    assert await gw.core.adapters.list("acme") == []
    # A served base model is not the tenant's to delete.
    base = await gw.client.delete("/v1/models/phi-3.5-mini", headers=gw.auth)
    assert base.status_code == 403 and base.json()["error"]["code"] == "permission_denied"


async def test_grpc_follows_the_same_rules(gw: InProcessGateway) -> None:
    b_key = (await tenant_b(gw))["Authorization"].removeprefix("Bearer ")
    assert (await register(gw)).status_code == 201
    server = await start_grpc_server(gw.core, gw.batch_apis, gw.settings, address="127.0.0.1:0")
    a = AsyncClient(f"127.0.0.1:{server.port}", api_key=gw.api_key, timeout_s=10)
    b = AsyncClient(f"127.0.0.1:{server.port}", api_key=b_key, timeout_s=10)
    try:
        rest = (await gw.client.get(f"/v1/models/{A_ID}", headers=gw.auth)).json()
        model = await a.get_model(A_ID)
        assert (model.id, model.owned_by, model.parent, model.root) == (
            A_ID,
            "acme",
            "phi-3.5-mini",
            "phi-3.5-mini",
        )
        assert (model.created, model.max_model_len) == (rest["created"], rest["max_model_len"])
        assert A_ID in {m.id for m in await a.list_models()}
        assert A_ID not in {m.id for m in await b.list_models()}
        assert (await a.get_model("phi-3.5-mini")).parent == ""
        details = []
        for model_id in (A_ID, "ft:phi-3.5-mini:acme:no-such-adapter"):
            for call in (b.get_model, b.delete_model):
                with pytest.raises(PhiserveRpcError) as caught:
                    await call(model_id)
                error = caught.value
                assert (error.code, error.error_code, error.param) == (
                    grpc.StatusCode.NOT_FOUND,
                    "model_not_found",
                    "model",
                )
                details.append(error.message.replace(model_id, "<id>"))
        assert len(set(details)) == 1
        deleted = await a.delete_model(A_ID)
        assert (deleted.id, deleted.deleted) == (A_ID, True)
        assert await gw.core.adapters.list("acme") == []
    finally:
        await a.close()
        await b.close()
        await server.stop(0)
