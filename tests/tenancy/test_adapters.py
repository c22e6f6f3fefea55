"""The adapter registry on a real Redis (issue 14): the per-tenant cap and the name's
uniqueness hold atomically, deletion, and one tenant's records never reach another's
lookups; the `ft:` model ids."""

from __future__ import annotations

import asyncio

import pytest
from pydantic import ValidationError

from services.errors import InvalidRequest, ResourceNotFound
from services.redis_store import RedisStore, keys
from services.tenancy.adapters import (
    AdapterRecord,
    AdapterRegistration,
    AdapterRegistry,
    adapter_model_id,
    new_record,
    parse_adapter_model_id,
)


def record(tenant: str, name: str) -> AdapterRecord:
    return new_record(
        tenant, name, base_model="phi-3.5-mini", path=f"/store/{name}", rank=8, target_modules=["qkv_proj"]
    )


async def test_register_get_list_delete(state: RedisStore) -> None:
    registry = AdapterRegistry(state)
    b = await registry.register(record("acme", "b"), max_adapters=8)
    a = await registry.register(record("acme", "a"), max_adapters=8)
    assert await registry.get("acme", "a") == a
    assert [r.name for r in await registry.list("acme")] == ["a", "b"]  # sorted by name
    assert await registry.delete("acme", "b") == b
    assert await registry.get("acme", "b") is None
    with pytest.raises(ResourceNotFound) as caught:
        await registry.delete("acme", "b")
    assert caught.value.code == "adapter_not_found"
    assert await state.redis.hkeys(keys.tenant_adapters("acme")) == ["a"]


async def test_a_name_is_registered_once(state: RedisStore) -> None:
    registry = AdapterRegistry(state)
    first = await registry.register(record("acme", "a"), max_adapters=8)
    with pytest.raises(InvalidRequest) as caught:
        await registry.register(record("acme", "a"), max_adapters=8)
    assert (caught.value.param, caught.value.code) == ("name", "adapter_exists")
    assert await registry.get("acme", "a") == first  # the first record is kept, version and all


async def test_the_cap_holds_when_many_register_at_once(state: RedisStore) -> None:
    registry = AdapterRegistry(state)
    outcomes = await asyncio.gather(
        *(registry.register(record("acme", f"a{i}"), max_adapters=3) for i in range(10)),
        return_exceptions=True,
    )
    assert sum(not isinstance(o, Exception) for o in outcomes) == 3
    assert {o.code for o in outcomes if isinstance(o, InvalidRequest)} == {"adapter_limit_reached"}
    assert len(await registry.list("acme")) == 3
    with pytest.raises(InvalidRequest):
        await registry.register(record("acme", "zero"), max_adapters=0)


async def test_tenants_do_not_see_each_others_adapters(state: RedisStore) -> None:
    registry = AdapterRegistry(state)
    await registry.register(record("acme", "support"), max_adapters=1)
    # Another tenant: its own cap, its own names, and nothing of acme's.
    await registry.register(record("globex", "support"), max_adapters=1)
    assert [r.tenant_id for r in await registry.list("globex")] == ["globex"]
    assert (await registry.get("globex", "support")).tenant_id == "globex"  # type: ignore[union-attr]
    with pytest.raises(ResourceNotFound):
        await registry.delete("initech", "support")
    assert await registry.get("acme", "support") is not None


def test_model_ids() -> None:
    assert adapter_model_id("phi-3.5-mini", "acme", "support") == "ft:phi-3.5-mini:acme:support"
    assert parse_adapter_model_id("ft:phi-3.5-mini:acme:support") == ("phi-3.5-mini", "acme", "support")
    for other in ("phi-3.5-mini", "ft:phi-3.5-mini:acme", "ft::acme:x", "ft:a:b:c:d"):
        assert parse_adapter_model_id(other) is None


@pytest.mark.parametrize("name", ["", "Upper", "a:b", "../x", "a/b", "x" * 64, "-lead"])
def test_names_that_could_break_an_id_or_a_path_are_refused(name: str) -> None:
    with pytest.raises(ValidationError):
        AdapterRegistration(name=name, base_model="phi-3.5-mini", source="x")
