"""Tenants and keys: only hashes are stored, revocation works, bootstrap is idempotent."""

from __future__ import annotations

import pytest

from services.errors import AuthenticationFailed, ResourceNotFound
from services.redis_store import RedisStore
from services.tenancy.models import Tenant, TenantsFile
from services.tenancy.store import TenantStore, hash_key


async def _all_redis_text(state: RedisStore) -> str:
    parts = []
    async for key in state.redis.scan_iter("*"):
        kind = await state.redis.type(key)
        if kind == "string":
            parts.append(await state.redis.get(key))
        elif kind == "set":
            parts.extend(await state.redis.smembers(key))
        elif kind == "hash":
            parts.extend(f"{k}={v}" for k, v in (await state.redis.hgetall(key)).items())
        parts.append(key)
    return "\n".join(parts)


async def test_keys_are_stored_only_as_hashes(state: RedisStore) -> None:
    store = TenantStore(state)
    await store.put_tenant(Tenant(id="acme"))
    plain, record = await store.create_key("acme", name="ci")
    assert plain.startswith("psk-") and len(plain) > 40
    assert record.prefix == plain[: len(record.prefix)] == f"psk-{record.id}"  # the id only
    everything = await _all_redis_text(state)
    assert plain not in everything
    assert plain[len(record.prefix) :] not in everything
    assert hash_key(plain) in everything
    tenant, got = await store.authenticate(plain)
    assert tenant.id == "acme" and got.id == record.id


async def test_unknown_missing_and_revoked_keys_fail(state: RedisStore) -> None:
    store = TenantStore(state)
    await store.put_tenant(Tenant(id="acme"))
    plain, record = await store.create_key("acme")
    with pytest.raises(AuthenticationFailed):
        await store.authenticate(None)
    with pytest.raises(AuthenticationFailed):
        await store.authenticate(plain + "x")
    await store.revoke_key("acme", record.id)
    with pytest.raises(AuthenticationFailed):
        await store.authenticate(plain)
    listed = await store.list_keys("acme")
    assert listed[0].revoked_at is not None


async def test_a_tenant_cannot_revoke_another_tenants_key(state: RedisStore) -> None:
    store = TenantStore(state)
    await store.put_tenant(Tenant(id="a"))
    await store.put_tenant(Tenant(id="b"))
    plain_b, record_b = await store.create_key("b")
    with pytest.raises(ResourceNotFound):
        await store.revoke_key("a", record_b.id)
    assert (await store.authenticate(plain_b))[0].id == "b"


async def test_disabled_tenant_is_refused(state: RedisStore) -> None:
    store = TenantStore(state)
    await store.put_tenant(Tenant(id="acme"))
    plain, _ = await store.create_key("acme")
    await store.put_tenant(Tenant(id="acme", disabled=True))
    with pytest.raises(AuthenticationFailed, match="disabled"):
        await store.authenticate(plain)


async def test_bootstrap_is_idempotent(state: RedisStore) -> None:
    store = TenantStore(state)
    file = TenantsFile.model_validate(
        {"tenants": [{"id": "t1", "weight": 2, "api_keys": ["psk-boot0001-secret-one"]}, {"id": "t2"}]}
    )
    await store.bootstrap(file)
    first = await store.list_keys("t1")
    await store.bootstrap(file)
    assert await store.list_keys("t1") == first
    assert [t.id for t in await store.list_tenants()] == ["t1", "t2"]
    assert (await store.authenticate("psk-boot0001-secret-one"))[0].weight == 2


# Issue 9, item 9: key ids were 32 bits with no collision check, and a bootstrap key's
# listed prefix was its first 12 characters (most of a short key).


async def test_key_ids_have_64_bits(state: RedisStore) -> None:
    store = TenantStore(state)
    await store.put_tenant(Tenant(id="acme"))
    plain, record = await store.create_key("acme")
    assert len(record.id) >= 16 and int(record.id, 16) >= 0
    assert plain.startswith(f"psk-{record.id}-")


async def test_a_colliding_key_id_never_replaces_another_key(
    state: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two keys drawn with the same id: the second must get another id, not take over the
    first one's id (revoking tenant A's key by its id would then revoke B's instead)."""
    import services.tenancy.store as store_module

    store = TenantStore(state)
    await store.put_tenant(Tenant(id="a"))
    await store.put_tenant(Tenant(id="b"))
    real = store_module.new_plain_key
    draws = iter(
        [
            ("00000000deadbeef", "psk-00000000deadbeef-first-secret-aaaaaaaaaaaaaaaa"),
            ("00000000deadbeef", "psk-00000000deadbeef-second-secret-bbbbbbbbbbbbbbb"),
        ]
    )
    monkeypatch.setattr(store_module, "new_plain_key", lambda: next(draws, None) or real())
    plain_a, record_a = await store.create_key("a")
    plain_b, record_b = await store.create_key("b")
    assert record_a.id == "00000000deadbeef"
    assert record_b.id != record_a.id and plain_b.startswith(f"psk-{record_b.id}-")
    await store.revoke_key("a", record_a.id)
    with pytest.raises(AuthenticationFailed):
        await store.authenticate(plain_a)
    assert (await store.authenticate(plain_b))[0].id == "b"
    assert [k.id for k in await store.list_keys("b")] == [record_b.id]


@pytest.mark.parametrize("plain", ["psk-demo0000-test-demo-key", "short-secret", "wxyzwxyz"])
async def test_a_bootstrap_keys_listed_prefix_reveals_almost_nothing(state: RedisStore, plain: str) -> None:
    store = TenantStore(state)
    await store.put_tenant(Tenant(id="acme"))
    record = await store.ensure_key("acme", plain, name="bootstrap")
    listed = await store.list_keys("acme")
    assert [k.id for k in listed] == [record.id]
    assert len(listed[0].prefix) <= 4 and len(listed[0].prefix) <= len(plain) // 4
    assert plain[:5] not in await _all_redis_text(state)  # nor does the id or anything else
    assert (await store.authenticate(plain))[1].id == record.id


async def test_concurrent_bootstraps_of_one_key_store_one_record(state: RedisStore) -> None:
    import asyncio

    store = TenantStore(state)
    await store.put_tenant(Tenant(id="acme"))
    plain = "psk-shared-bootstrap-key-0001"
    records = await asyncio.gather(*(store.ensure_key("acme", plain) for _ in range(5)))
    assert len({r.id for r in records}) == 1
    assert [k.id for k in await store.list_keys("acme")] == [records[0].id]
