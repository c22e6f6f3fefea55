"""GET /v1/models/{model} and GET /v1/files' filters on the in-process gateway (real core,
app, batch APIs and Redis; fake engines, no Ray). The official SDK against the cluster:
tests/gateway/test_endpoints.py."""

from __future__ import annotations

from typing import Any

from services.tenancy.models import Tenant
from tests.fakes.gateway import InProcessGateway

LINE = b'{"custom_id": "a", "method": "POST", "url": "/v1/completions", "body": {"model": "phi-3.5-mini", "prompt": "hi"}}\n'


async def test_a_model_is_retrieved_as_its_list_entry_slashes_and_dots_included(
    inprocess_gateway: InProcessGateway,
) -> None:
    gw = inprocess_gateway
    listed = {m["id"]: m for m in (await gw.client.get("/v1/models", headers=gw.auth)).json()["data"]}
    for name in ("phi-3.5-mini", "microsoft/Phi-3.5-mini-instruct", "phi-3.5-vision-instruct"):
        answer = await gw.client.get(f"/v1/models/{name}", headers=gw.auth)
        assert answer.status_code == 200, answer.text
        assert answer.json() == listed[name]
    # Without a key: 401, before routing (a tenant's route, unlike the public list).
    assert (await gw.client.get("/v1/models/phi-3.5-mini")).status_code == 401


async def test_a_model_the_tenant_may_not_use_is_the_same_404_as_a_missing_one(
    inprocess_gateway: InProcessGateway,
) -> None:
    gw = inprocess_gateway
    key = await gw.add_tenant(Tenant(id="narrow", allowed_models=["phi-3.5-vision"]))
    narrow = {"Authorization": f"Bearer {key}"}

    async def refusal(name: str) -> dict[str, Any]:
        answer = await gw.client.get(f"/v1/models/{name}", headers=narrow)
        assert answer.status_code == 404, answer.text
        body: dict[str, Any] = answer.json()
        body["error"]["message"] = body["error"]["message"].replace(name, "<name>")
        return body

    missing = await refusal("gpt-4")
    assert missing["error"]["code"] == "model_not_found" and missing["error"]["param"] == "model"
    assert await refusal("phi-3.5-mini") == missing
    assert await refusal("microsoft/Phi-3.5-mini-instruct") == missing
    # Any name of an allowed pool is allowed (the gate's rule), and the list agrees.
    assert (
        await gw.client.get("/v1/models/microsoft/Phi-3.5-vision-instruct", headers=narrow)
    ).status_code == 200
    listed = {m["id"] for m in (await gw.client.get("/v1/models", headers=narrow)).json()["data"]}
    assert listed == {"phi-3.5-vision", "phi-3.5-vision-instruct", "microsoft/Phi-3.5-vision-instruct"}
    # Without a key the list stays public and whole; with a wrong key it is a 401.
    public = (await gw.client.get("/v1/models")).json()["data"]
    assert len(public) == sum(len(p.names) for p in gw.core.catalog.enabled_pools)
    wrong = await gw.client.get("/v1/models", headers={"Authorization": "Bearer sk-wrong"})
    assert wrong.status_code == 401, wrong.text


async def _upload(gw: InProcessGateway, headers: dict[str, str], name: str) -> str:
    answer = await gw.client.post(
        "/v1/files", files={"file": (name, LINE)}, data={"purpose": "batch"}, headers=headers
    )
    assert answer.status_code == 200, answer.text
    file_id: str = answer.json()["id"]
    return file_id


async def test_files_list_filters_order_and_pages(inprocess_gateway: InProcessGateway) -> None:
    gw = inprocess_gateway
    ids = [await _upload(gw, gw.auth, f"f{i}.jsonl") for i in range(3)]

    async def page(**params: Any) -> dict[str, Any]:
        answer = await gw.client.get("/v1/files", params=params, headers=gw.auth)
        assert answer.status_code == 200, answer.text
        body: dict[str, Any] = answer.json()
        return body

    newest_first = await page()
    assert [f["id"] for f in newest_first["data"]] == ids[::-1]
    assert newest_first["object"] == "list" and newest_first["has_more"] is False
    assert (newest_first["first_id"], newest_first["last_id"]) == (ids[2], ids[0])
    first = await page(order="asc", limit=2)
    assert [f["id"] for f in first["data"]] == ids[:2] and first["has_more"] is True
    assert first["last_id"] == ids[1]
    rest = await page(order="asc", limit=2, after=first["last_id"])
    assert [f["id"] for f in rest["data"]] == ids[2:] and rest["has_more"] is False
    assert [f["id"] for f in (await page(after=ids[2]))["data"]] == ids[:2][::-1]
    assert [f["id"] for f in (await page(purpose="batch"))["data"]] == ids[::-1]
    empty = await page(purpose="batch_output")
    assert empty["data"] == [] and empty["first_id"] is None and empty["has_more"] is False


async def test_files_list_bad_filters_are_400s_naming_the_param(inprocess_gateway: InProcessGateway) -> None:
    gw = inprocess_gateway
    for params, param in (
        ({"order": "newest"}, "order"),
        ({"limit": 0}, "limit"),
        ({"limit": 10001}, "limit"),
        ({"limit": "many"}, "limit"),
        ({"purpose": "memes"}, "purpose"),
        ({"after": "file-nope"}, "after"),
    ):
        answer = await gw.client.get("/v1/files", params=params, headers=gw.auth)
        assert answer.status_code == 400, (params, answer.text)
        assert answer.json()["error"]["param"] == param, (params, answer.text)


async def test_another_tenant_cannot_list_a_tenants_files_with_any_filter(
    inprocess_gateway: InProcessGateway,
) -> None:
    gw = inprocess_gateway
    mine = await _upload(gw, gw.auth, "mine.jsonl")
    key = await gw.add_tenant(Tenant(id="attacker"))
    attacker = {"Authorization": f"Bearer {key}"}
    theirs = await _upload(gw, attacker, "theirs.jsonl")
    for params in ({}, {"order": "asc"}, {"purpose": "batch"}, {"limit": 10000}):
        answer = await gw.client.get("/v1/files", params=params, headers=attacker)
        assert [f["id"] for f in answer.json()["data"]] == [theirs], answer.text
    # The victim's file id as a cursor is as unknown as a made-up one.
    probe = await gw.client.get("/v1/files", params={"after": mine}, headers=attacker)
    made_up = await gw.client.get("/v1/files", params={"after": "file-000"}, headers=attacker)
    assert probe.status_code == made_up.status_code == 400
    assert probe.json()["error"]["message"].replace(mine, "") == made_up.json()["error"]["message"].replace(
        "file-000", ""
    )
