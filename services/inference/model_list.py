"""GET /v1/models, GET /v1/models/{model} and DELETE /v1/models/{model} (and gRPC's
ListModels, GetModel, DeleteModel): served names and aliases, with modality and context
length, and the calling tenant's own LoRA adapters. A model backed by a short and a long
pool is one entry with the long context (the long pool has no names of its own).

Without a key the list names every served model (public, like /health) and no adapter.
A tenant sees the models it may use, in the list and one by one: a model it may not use is
answered as one that does not exist (the same 404 body), so a key does not learn of other
tenants' models. Adapters follow the same rule (issue 14): a tenant's own appear as OpenAI
fine-tunes (`ft:<base>:<tenant>:<name>`, `owned_by` the tenant, `parent` the base model);
another tenant's id is the same 404 as a made-up name, decided before any Redis read (the
id's tenant part is not the caller's), so neither the answer nor its timing tells whether
it exists. Only the owner deletes an adapter, through DELETE as OpenAI's
`client.models.delete`; a served base model cannot be deleted (403).
"""

from __future__ import annotations

from pathlib import Path

from services.catalog.models import Catalog, PoolConfig
from services.errors import ModelNotFound, PermissionDenied, ResourceNotFound
from services.inference.protocol.responses import Model, ModelDeleted, ModelList
from services.tenancy.adapters import AdapterRecord, AdapterRegistry, parse_adapter_model_id
from services.tenancy.models import Tenant


class ModelsService:
    def __init__(self, catalog: Catalog, model_dir: Path, adapters: AdapterRegistry | None = None) -> None:
        """`adapters` None: no tenant adapters (every `ft:` id is an unknown model)."""
        self._adapters = adapters
        # A tenant allowed any name of a pool may use all of its names (TenantGate's rule).
        self._pool_names = {pool.name: pool.names for pool in catalog.enabled_pools}
        # The pools an adapter may run on, by canonical served name (what a record stores).
        self._lora_pools = {
            pool.served_names[0]: pool
            for pool in catalog.enabled_pools
            if pool.engine.enable_lora and pool.served_names
        }
        self._listing: ModelList = {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": _created(pool.resolve_model_path(model_dir)),
                    "owned_by": "phiserve",
                    "root": pool.served_names[0],
                    "parent": None,
                    "pool": pool.name,
                    "modality": pool.modality.value,
                    "max_model_len": pool.context_len,  # a long_context_pool's, when it has one
                    "max_images_per_request": pool.max_images_per_request,
                }
                for pool in catalog.enabled_pools
                for name in pool.names
            ],
        }

    async def list(self, tenant: Tenant | None = None) -> ModelList:
        """Every served model; with a tenant, those it may use and its own adapters."""
        if tenant is None:
            return self._listing
        served = [m for m in self._listing["data"] if self._allows(tenant, m)]
        records = await self._adapters.list(tenant.id) if self._adapters is not None else []
        own = [entry for record in records if (entry := self._adapter_entry(tenant, record)) is not None]
        return {"object": "list", "data": [*served, *own]}

    async def retrieve(self, tenant: Tenant, model: str) -> Model:
        """The list's entry of `model`; 404 `model_not_found` when it is not served, the
        tenant may not use it or it is another tenant's adapter (one answer for all)."""
        for entry in self._listing["data"]:
            if entry["id"] == model and self._allows(tenant, entry):
                return entry
        record = await self._own_record(tenant, model)
        adapter = self._adapter_entry(tenant, record) if record is not None else None
        if adapter is None:
            raise _not_found(model)
        return adapter

    async def delete(self, tenant: Tenant, model: str) -> ModelDeleted:
        """Deletes the tenant's own adapter `model`; the same 404 as `retrieve` for anything
        that is not one, 403 for a base model the tenant can see."""
        if any(entry["id"] == model and self._allows(tenant, entry) for entry in self._listing["data"]):
            raise PermissionDenied(
                f"The model '{model}' is a served base model; only your own fine-tuned models "
                "(ft:...) can be deleted",
                param="model",
            )
        record = await self._own_record(tenant, model)
        if record is None or self._adapters is None:
            raise _not_found(model)
        try:
            await self._adapters.delete(tenant.id, record.name)
        except ResourceNotFound as exc:  # deleted meanwhile by another call
            raise _not_found(model) from exc
        return {"id": model, "object": "model", "deleted": True}

    async def _own_record(self, tenant: Tenant, model: str) -> AdapterRecord | None:
        parsed = parse_adapter_model_id(model)
        # Another tenant's id (or no registry) is refused before any Redis read.
        if parsed is None or parsed[1] != tenant.id or self._adapters is None:
            return None
        record = await self._adapters.get(tenant.id, parsed[2])
        return record if record is not None and record.id == model else None

    def _adapter_entry(self, tenant: Tenant, record: AdapterRecord) -> Model | None:
        """The adapter's entry, or None when it cannot be called now: its base model is no
        longer served with LoRA, or the tenant may no longer use it (as ModelResolver)."""
        pool = self._lora_pools.get(record.base_model)
        if pool is None or not tenant.allows(pool.names):
            return None
        return _adapter_model(record, pool)

    def _allows(self, tenant: Tenant, entry: Model) -> bool:
        return tenant.allows(self._pool_names[entry["pool"]])


def _adapter_model(record: AdapterRecord, pool: PoolConfig) -> Model:
    return {
        "id": record.id,
        "object": "model",
        "created": record.created_at,
        "owned_by": record.tenant_id,
        "root": record.base_model,
        "parent": record.base_model,
        "pool": pool.name,
        "modality": pool.modality.value,
        "max_model_len": pool.context_len,
        "max_images_per_request": pool.max_images_per_request,
    }


def _not_found(model: str) -> ModelNotFound:
    return ModelNotFound(f"The model '{model}' does not exist", param="model")


def _created(model: str) -> int:
    """When the model's files were written: the same on every gateway replica (each replica's
    start time made a list and a retrieve on two replicas disagree). 0 when the weights are
    not on the gateway's disk (a hub id the pool downloads)."""
    config = Path(model) / "config.json"
    return int(config.stat().st_mtime) if config.is_file() else 0
