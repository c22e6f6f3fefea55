"""Registering tenants' adapters (issue 14) on real Redis, real files and the tiny
Phi-3.5-mini's real weights: the base model, the source's place on disk (from the side of
someone who tries to read outside the adapter store), the files' validation off the event
loop, the per-tenant cap under concurrent registrations."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from services.catalog.loader import load_catalog
from services.errors import InvalidAdapter, InvalidRequest, ResourceNotFound
from services.inference.adapter_admin import AdapterAdmin
from services.pools.adapter_files import check_adapter_folder
from services.pools.adapter_sources import AdapterSources
from services.redis_store import RedisStore
from services.tenancy.adapters import AdapterRegistration, AdapterRegistry
from services.tenancy.models import Tenant, TenantLimits
from services.tenancy.store import TenantStore
from tests.helpers import OffLoopProbe
from tests.lora_files import lora_tensors, peft_config, write_adapter

ACME = Tenant(id="acme", name="Acme", limits=TenantLimits(max_adapters=3))


class Setup:
    def __init__(self, state: RedisStore, tmp_path: Path, model_dir: Path) -> None:
        self.store = tmp_path / "store"
        self.root = tmp_path / "volume"
        self.outside = tmp_path / "outside"
        for folder in (self.store, self.root, self.outside):
            folder.mkdir()
        self.tenants = TenantStore(state, tenant_cache_ttl_s=0)
        self.registry = AdapterRegistry(state)
        self.check = check_adapter_folder
        self.admin = AdapterAdmin(
            load_catalog("local"),
            self.registry,
            self.tenants,
            AdapterSources(self.store, [self.root]),
            model_dir=model_dir,
            max_adapter_bytes=1024 * 1024,
            check=lambda *args, **kwargs: self.check(*args, **kwargs),
        )

    async def register(self, source: str, name: str = "support", **fields: object) -> object:
        body = AdapterRegistration.model_validate(
            {"name": name, "base_model": "phi-3.5-mini", "source": source, **fields}
        )
        return await self.admin.register("acme", body)


@pytest.fixture
async def setup(state: RedisStore, tmp_path: Path, tiny_models: dict[str, Path]) -> Setup:
    s = Setup(state, tmp_path, tiny_models["phi-3.5-mini-tiny"].parent)
    await s.tenants.put_tenant(ACME)
    return s


async def test_register_list_delete(setup: Setup) -> None:
    write_adapter(setup.store / "support")
    record = await setup.admin.register(
        "acme",
        AdapterRegistration(
            name="support", base_model="microsoft/Phi-3.5-mini-instruct", source="support", rank=8
        ),
    )
    # Registered under an alias, stored under the canonical served name.
    assert record.id == "ft:phi-3.5-mini:acme:support"
    assert (record.tenant_id, record.name, record.base_model) == ("acme", "support", "phi-3.5-mini")
    assert record.path == str(setup.store / "support")
    assert (record.rank, record.target_modules) == (8, ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"])
    assert await setup.admin.list("acme") == [record]
    assert await setup.admin.delete("acme", "support") == record
    assert await setup.admin.list("acme") == []
    with pytest.raises(ResourceNotFound):
        await setup.admin.delete("acme", "support")


async def test_a_tenant_that_does_not_exist_is_a_404(setup: Setup) -> None:
    write_adapter(setup.store / "support")
    body = AdapterRegistration(name="support", base_model="phi-3.5-mini", source="support")
    for call in (
        setup.admin.register("ghost", body),
        setup.admin.list("ghost"),
        setup.admin.delete("ghost", "support"),
    ):
        with pytest.raises(ResourceNotFound, match="no tenant 'ghost'"):
            await call
    assert await setup.registry.list("ghost") == []


@pytest.mark.parametrize("base_model", ["phi-3.5-moe", "phi-3.5-vision", "text-long", "gpt-4o"])
async def test_the_base_model_must_serve_lora(setup: Setup, base_model: str) -> None:
    write_adapter(setup.store / "support")
    with pytest.raises(InvalidRequest) as caught:
        await setup.register("support", base_model=base_model)
    assert (caught.value.param, caught.value.code) == ("base_model", "model_not_lora")
    assert caught.value.message.endswith("those that have them: phi-3.5-mini")


async def test_a_base_model_the_tenant_may_not_use(setup: Setup) -> None:
    await setup.tenants.put_tenant(ACME.model_copy(update={"allowed_models": ["phi-3.5-moe"]}))
    write_adapter(setup.store / "support")
    with pytest.raises(InvalidRequest) as caught:
        await setup.register("support")
    assert caught.value.code == "model_not_allowed"


async def test_sources_outside_the_store_and_roots_are_refused(setup: Setup, tmp_path: Path) -> None:
    secret = write_adapter(setup.outside / "secret")
    (setup.store / "sub").mkdir()
    os.symlink(secret, setup.store / "link")  # a link inside the store to a folder outside
    os.symlink(setup.outside, setup.store / "sub" / "up")
    sources = {
        "../outside/secret": "may not contain '..'",
        "sub/../../outside/secret": "may not contain '..'",
        str(secret): "outside the adapter store and the allowed roots",
        f"file://{secret}": "outside the adapter store",
        f"file://{setup.root}/../outside/secret": "may not contain '..'",
        f"file://{setup.root}/%2e%2e/outside/secret": "may not contain '..'",
        f"file://evil.example{setup.root}/a": "no host, query or fragment",
        "file:relative/path": "absolute path",
        "link": "outside the adapter store",
        "sub/up/secret": "outside the adapter store",
        "/etc": "outside the adapter store",
        "support\x00": "NUL",
    }
    for source, message in sources.items():
        with pytest.raises(InvalidRequest) as caught:
            await setup.register(source)
        assert (caught.value.param, caught.value.code) == ("source", "invalid_adapter_source"), source
        assert message in caught.value.message, source
    assert await setup.registry.list("acme") == []


async def test_adapter_files_linked_out_of_the_roots_are_not_read(setup: Setup) -> None:
    folder = write_adapter(setup.store / "support")
    # Whatever the validator would say about the linked file could tell of its contents.
    (setup.outside / "shadow").write_text("root:$6$secret")
    (folder / "adapter_config.json").unlink()
    os.symlink(setup.outside / "shadow", folder / "adapter_config.json")
    read: list[Path] = []
    setup.check = lambda path, **kwargs: read.append(path)  # type: ignore[assignment,func-returns-value]
    with pytest.raises(InvalidRequest, match="adapter_config.json is a link to a file outside"):
        await setup.register("support")
    assert read == []


async def test_sources_inside_the_store_or_a_root(setup: Setup) -> None:
    write_adapter(setup.root / "team" / "v1")
    by_path = await setup.register(str(setup.root / "team" / "v1"), name="by-path")
    by_uri = await setup.register(f"file://{setup.root}/team/v1", name="by-uri")
    os.symlink(setup.root / "team", setup.store / "team")  # a link from the store into a root
    linked = await setup.register("team/v1", name="linked")
    assert {by_path.path, by_uri.path, linked.path} == {str(setup.root / "team" / "v1")}


async def test_invalid_files_are_a_400_and_nothing_is_stored(setup: Setup) -> None:
    tensors = lora_tensors()
    tensors["base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"][0, 0] = float("nan")
    write_adapter(setup.store / "nan", tensors=tensors)
    with pytest.raises(InvalidAdapter, match="NaN"):
        await setup.register("nan")
    write_adapter(setup.store / "big", rank=32, config=peft_config(rank=32))
    with pytest.raises(InvalidAdapter, match="above this model's max_lora_rank 16"):
        await setup.register("big")
    write_adapter(setup.store / "support")
    with pytest.raises(
        InvalidRequest, match="rank 4 was given, but the adapter's files have rank 8"
    ) as caught:
        await setup.register("support", rank=4)
    assert caught.value.param == "rank"
    with pytest.raises(InvalidAdapter, match="not a folder"):
        await setup.register("nothing-here")
    assert await setup.registry.list("acme") == []


async def test_the_files_are_checked_off_the_event_loop(setup: Setup) -> None:
    write_adapter(setup.store / "support")
    probe = OffLoopProbe(check_adapter_folder, asyncio.get_running_loop())
    setup.check = probe
    await setup.register("support")
    probe.assert_off_loop()


async def test_the_cap_holds_under_concurrent_registrations(setup: Setup) -> None:
    write_adapter(setup.store / "support")
    outcomes = await asyncio.gather(
        *(setup.register("support", name=f"a{i}") for i in range(6)), return_exceptions=True
    )
    refused = [o for o in outcomes if isinstance(o, InvalidRequest)]
    assert len(refused) == 3 and {e.code for e in refused} == {"adapter_limit_reached"}
    assert len(await setup.registry.list("acme")) == ACME.limits.max_adapters
    # Deleting one makes room for one.
    names = [record.name for record in await setup.registry.list("acme")]
    await setup.admin.delete("acme", names[0])
    await setup.register("support", name="again")
    with pytest.raises(InvalidRequest) as caught:
        await setup.register("support", name="again")
    assert caught.value.code == "adapter_exists"
