"""Model resolution of tenants' adapters (issue 14) on the real Redis registry, no cluster.

From the attacker's side: another tenant's `ft:` id, or any id that is not exactly the
caller's own registered adapter, fails with the very error an unknown model gets, and a
foreign id or a plain name costs no Redis read at all (checked with MONITOR).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from services.catalog.loader import load_catalog
from services.errors import ModelNotFound
from services.inference.adapter_models import ModelResolver
from services.inference.errors import error_payload
from services.inference.router import PoolRouter
from services.pools.engine import AdapterRef
from services.redis_store import RedisStore, keys
from services.tenancy.adapters import AdapterRecord, AdapterRegistry, adapter_model_id, new_record
from tests.conftest import UNIT_DB, LocalRedis
from tests.redis_store.monitor import commands_during


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _record(tenant: str, name: str, base: str = "phi-3.5-mini") -> AdapterRecord:
    return new_record(
        tenant, name, base_model=base, path=f"/adapters/{tenant}/{name}", rank=8, target_modules=["qkv_proj"]
    )


def _resolver(state: RedisStore, clock: Clock | None = None, **kwargs: Any) -> ModelResolver:
    router = PoolRouter(load_catalog("local"), {}, assign_timeout_s=1.0)
    return ModelResolver(router, AdapterRegistry(state), ttl_s=2.0, clock=clock or Clock(), **kwargs)


async def _refusal(resolver: ModelResolver, model: str, tenant_id: str | None) -> tuple[Any, ...]:
    """The status, body and headers the client would get, with the model name it sent
    replaced by a placeholder (the message quotes it)."""
    with pytest.raises(ModelNotFound) as caught:
        await resolver.resolve(model, tenant_id=tenant_id)
    status, body, headers = error_payload(caught.value)
    body["error"]["message"] = body["error"]["message"].replace(model, "<model>")
    return status, body, headers


async def _commands_during(
    redis_server: LocalRedis, state: RedisStore, action: Callable[[], Awaitable[Any]]
) -> list[str]:
    """Every command Redis ran on the unit database while `action` ran (MONITOR)."""
    return await commands_during(f"redis://127.0.0.1:{redis_server.port}/{UNIT_DB}", state.redis, action)


async def test_a_tenants_own_adapter_resolves_to_its_base_pool_and_record(state: RedisStore) -> None:
    registry = AdapterRegistry(state)
    record = await registry.register(_record("alpha", "support"), max_adapters=8)
    resolved = await _resolver(state).resolve(record.id, tenant_id="alpha")
    assert resolved.pool.name == "text"
    assert resolved.adapter == AdapterRef(record.id, record.path, record.version)
    assert record.id == "ft:phi-3.5-mini:alpha:support"


async def test_anything_but_the_callers_own_adapter_is_the_unknown_model_404(state: RedisStore) -> None:
    registry = AdapterRegistry(state)
    await registry.register(_record("alpha", "support"), max_adapters=8)
    # A record whose base is a pool without LoRA (written as a stale record would be).
    await registry.register(_record("bravo", "vis", base="phi-3.5-vision"), max_adapters=8)
    await registry.register(_record("bravo", "mine"), max_adapters=8)
    resolver = _resolver(state)
    unknown = await _refusal(resolver, "no-such-model", "bravo")
    assert unknown[0] == 404 and unknown[1]["error"]["code"] == "model_not_found"
    attempts = {
        "alpha's adapter, called by bravo": ("ft:phi-3.5-mini:alpha:support", "bravo"),
        "a made-up adapter of alpha": ("ft:phi-3.5-mini:alpha:made-up", "bravo"),
        "a made-up adapter of bravo's own": ("ft:phi-3.5-mini:bravo:made-up", "bravo"),
        "bravo's adapter under another base": ("ft:phi-3.5-moe:bravo:mine", "bravo"),
        "bravo's adapter under an alias of its base": ("ft:phi-3.5-mini-instruct:bravo:mine", "bravo"),
        "an adapter on a pool without LoRA": ("ft:phi-3.5-vision:bravo:vis", "bravo"),
        "no tenant known": ("ft:phi-3.5-mini:bravo:mine", None),
        "too few parts": ("ft:phi-3.5-mini:bravo", "bravo"),
        "too many parts": ("ft:phi-3.5-mini:bravo:mine:x", "bravo"),
        "an empty part": ("ft:phi-3.5-mini::mine", "bravo"),
    }
    for what, (model, tenant_id) in attempts.items():
        assert await _refusal(resolver, model, tenant_id) == unknown, what
    # bravo's own, exactly named, does resolve (the refusals above are not a broken resolver).
    assert (await resolver.resolve("ft:phi-3.5-mini:bravo:mine", tenant_id="bravo")).adapter is not None


async def test_plain_names_and_foreign_ids_cost_no_redis_read(
    redis_server: LocalRedis, state: RedisStore
) -> None:
    await AdapterRegistry(state).register(_record("alpha", "support"), max_adapters=8)
    resolver = _resolver(state)

    async def plain_and_foreign() -> None:
        assert (await resolver.resolve("phi-3.5-mini", tenant_id="bravo")).adapter is None
        assert (await resolver.resolve("phi-3.5-mini-instruct", tenant_id=None)).pool.name == "text"
        with pytest.raises(ModelNotFound):
            await resolver.resolve("ft:phi-3.5-mini:alpha:support", tenant_id="bravo")

    assert await _commands_during(redis_server, state, plain_and_foreign) == []

    async def own_twice() -> None:
        for _ in range(2):
            await resolver.resolve("ft:phi-3.5-mini:alpha:support", tenant_id="alpha")

    seen = await _commands_during(redis_server, state, own_twice)
    assert len(seen) == 1 and seen[0] == f"HGET {keys.tenant_adapters('alpha')} support", seen


async def test_records_are_cached_for_the_ttl_and_new_ones_are_found_at_once(state: RedisStore) -> None:
    registry = AdapterRegistry(state)
    clock = Clock()
    resolver = _resolver(state, clock)
    model = adapter_model_id("phi-3.5-mini", "alpha", "support")
    with pytest.raises(ModelNotFound):
        await resolver.resolve(model, tenant_id="alpha")
    # Registered right after a failed lookup: found on the next request (no negative cache).
    first = await registry.register(_record("alpha", "support"), max_adapters=8)
    assert (await resolver.resolve(model, tenant_id="alpha")).adapter == AdapterRef(
        first.id, first.path, first.version
    )
    # Deleted and registered again (a new version): the cached record serves until the TTL ends.
    await registry.delete("alpha", "support")
    second = await registry.register(_record("alpha", "support"), max_adapters=8)
    assert second.version != first.version
    clock.now += 1.9
    assert (await resolver.resolve(model, tenant_id="alpha")).adapter.version == first.version  # type: ignore[union-attr]
    clock.now += 0.2
    assert (await resolver.resolve(model, tenant_id="alpha")).adapter.version == second.version  # type: ignore[union-attr]
    # Deleted: gone once the TTL has passed.
    await registry.delete("alpha", "support")
    clock.now += 2.1
    with pytest.raises(ModelNotFound):
        await resolver.resolve(model, tenant_id="alpha")


async def test_the_cache_is_bounded(state: RedisStore) -> None:
    registry = AdapterRegistry(state)
    resolver = _resolver(state, max_records=1)
    for name in ("one", "two"):
        await registry.register(_record("alpha", name), max_adapters=8)
        await resolver.resolve(f"ft:phi-3.5-mini:alpha:{name}", tenant_id="alpha")
    await registry.delete("alpha", "one")
    # "one" was pushed out by "two" (max_records=1), so it is read again and found deleted,
    # though its TTL has not run out.
    with pytest.raises(ModelNotFound):
        await resolver.resolve("ft:phi-3.5-mini:alpha:one", tenant_id="alpha")
    assert (await resolver.resolve("ft:phi-3.5-mini:alpha:two", tenant_id="alpha")).adapter is not None
