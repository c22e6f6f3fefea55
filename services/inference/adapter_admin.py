"""Registering, listing and deleting tenants' LoRA adapters (issue 14): the admin API's logic.

Registration turns an `AdapterRegistration` into a stored `AdapterRecord` in four steps,
each refusal a typed 4xx:
1. the tenant exists (404 otherwise) and may use the base model;
2. the base model is a served name or alias of an enabled pool with LoRA on (400 naming
   the models that have it); the record keeps the canonical served name, so the adapter's
   id is the same whichever alias it was registered under;
3. the source is a folder inside the adapter store or an allowed root (AdapterSources);
4. its files pass `check_adapter_folder` against that pool's base weights and
   `max_lora_rank` (in a thread: it reads the whole weights file to check its values).
The record is then written by `AdapterRegistry.register`, which checks the tenant's cap
(`limits.max_adapters`) and the name's uniqueness in the same atomic step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

from services.catalog.models import Catalog, PoolConfig
from services.errors import InvalidRequest
from services.pools.adapter_files import AdapterFiles, check_adapter_folder
from services.pools.adapter_sources import AdapterSources
from services.tenancy.adapters import AdapterRecord, AdapterRegistration, AdapterRegistry, new_record
from services.tenancy.store import TenantStore

AdapterCheck = Callable[..., AdapterFiles]


class AdapterAdmin:
    def __init__(
        self,
        catalog: Catalog,
        registry: AdapterRegistry,
        tenants: TenantStore,
        sources: AdapterSources,
        *,
        model_dir: Path,
        max_adapter_bytes: int,
        check: AdapterCheck = check_adapter_folder,
    ) -> None:
        self._registry = registry
        self._tenants = tenants
        self._sources = sources
        self._model_dir = model_dir
        self._max_bytes = max_adapter_bytes
        self._check = check
        # Only pools with names: a long_context_pool is reached through its short pool's.
        self._lora_pools = {
            name: pool for pool in catalog.enabled_pools if pool.engine.enable_lora for name in pool.names
        }
        self._lora_models = sorted({pool.served_names[0] for pool in self._lora_pools.values()})

    async def register(self, tenant_id: str, body: AdapterRegistration) -> AdapterRecord:
        tenant = await self._tenants.get_tenant(tenant_id)
        pool = self._base_pool(body.base_model)
        if not tenant.allows(pool.names):
            raise InvalidRequest(
                f"tenant '{tenant_id}' may not use the model '{body.base_model}' (its allowed_models)",
                param="base_model",
                code="model_not_allowed",
            )
        folder = self._sources.resolve(body.source)
        files = await asyncio.to_thread(
            self._check,
            folder,
            base_model_path=pool.resolve_model_path(self._model_dir),
            max_rank=pool.engine.max_lora_rank,
            max_bytes=self._max_bytes,
        )
        if body.rank is not None and body.rank != files.rank:
            raise InvalidRequest(
                f"rank {body.rank} was given, but the adapter's files have rank {files.rank}",
                param="rank",
                code="invalid_adapter",
            )
        record = new_record(
            tenant.id,
            body.name,
            base_model=pool.served_names[0],
            path=str(folder),
            rank=files.rank,
            target_modules=list(files.target_modules),
        )
        return await self._registry.register(record, max_adapters=tenant.limits.max_adapters)

    async def list(self, tenant_id: str) -> list[AdapterRecord]:
        await self._tenants.get_tenant(tenant_id)  # 404 for a tenant that does not exist
        return await self._registry.list(tenant_id)

    async def delete(self, tenant_id: str, name: str) -> AdapterRecord:
        await self._tenants.get_tenant(tenant_id)
        return await self._registry.delete(tenant_id, name)

    def _base_pool(self, base_model: str) -> PoolConfig:
        pool = self._lora_pools.get(base_model)
        if pool is None:
            served = ", ".join(self._lora_models) or "none (no pool has enable_lora)"
            raise InvalidRequest(
                f"'{base_model}' is not a served model with LoRA adapters; those that have them: {served}",
                param="base_model",
                code="model_not_lora",
            )
        return pool
