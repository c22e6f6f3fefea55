"""GET /v1/models and /v1/models/{model}: served names and aliases, with modality and
context length. A model backed by a short and a long pool is one entry with the long
context (the long pool has no names of its own).

Without a key the list names every served model (public, like /health). A tenant sees the
models it may use, in the list and one by one: a model it may not use is answered as one
that does not exist (the same 404 body), so a key does not learn of other tenants' models.
"""

from __future__ import annotations

from pathlib import Path

from services.catalog.models import Catalog
from services.errors import ModelNotFound
from services.inference.protocol.responses import Model, ModelList
from services.tenancy.models import Tenant


class ModelsService:
    def __init__(self, catalog: Catalog, model_dir: Path) -> None:
        # A tenant allowed any name of a pool may use all of its names (TenantGate's rule).
        self._pool_names = {pool.name: pool.names for pool in catalog.enabled_pools}
        self._listing: ModelList = {
            "object": "list",
            "data": [
                {
                    "id": name,
                    "object": "model",
                    "created": _created(pool.resolve_model_path(model_dir)),
                    "owned_by": "phiserve",
                    "root": pool.served_names[0],
                    "pool": pool.name,
                    "modality": pool.modality.value,
                    "max_model_len": pool.context_len,  # a long_context_pool's, when it has one
                    "max_images_per_request": pool.max_images_per_request,
                }
                for pool in catalog.enabled_pools
                for name in pool.names
            ],
        }

    def list(self, tenant: Tenant | None = None) -> ModelList:
        """Every served model; with a tenant, those it may use."""
        if tenant is None:
            return self._listing
        return {"object": "list", "data": [m for m in self._listing["data"] if self._allows(tenant, m)]}

    def retrieve(self, tenant: Tenant, model: str) -> Model:
        """The list's entry of `model`; 404 `model_not_found` when it is not served or the
        tenant may not use it (one answer for both)."""
        for entry in self._listing["data"]:
            if entry["id"] == model and self._allows(tenant, entry):
                return entry
        raise ModelNotFound(f"The model '{model}' does not exist", param="model")

    def _allows(self, tenant: Tenant, entry: Model) -> bool:
        return tenant.allows(self._pool_names[entry["pool"]])


def _created(model: str) -> int:
    """When the model's files were written: the same on every gateway replica (each replica's
    start time made a list and a retrieve on two replicas disagree). 0 when the weights are
    not on the gateway's disk (a hub id the pool downloads)."""
    config = Path(model) / "config.json"
    return int(config.stat().st_mtime) if config.is_file() else 0
