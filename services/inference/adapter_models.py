"""Model resolution: a request's `model` to the pool that runs it and the tenant's LoRA adapter.

A plain name is the router's (`PoolRouter.resolve`), with no Redis call. A fine-tune id,
`ft:<base>:<tenant>:<name>` (issue 14), is the caller's adapter only when all of these hold:
the tenant part is the caller's own, the caller has a registered adapter of that name (read
from the caller's own registry hash: another tenant's records are never looked at), its
base model is the id's base, and that base's pool serves LoRA. Any other case raises the
very `ModelNotFound` an unknown name gets, so a tenant learns nothing of others' adapters,
not even whether one exists (same body, same status, and no Redis read that a timing could
tell apart: a foreign id is refused before any).

The base model's access rule (`tenant.allows`) is applied by the callers, as for the plain
name (the gate's `check_access` on the pool).

Records are cached per replica for `ttl_s` (bounded, least recently stored go first), so a
busy adapter costs one Redis read per `ttl_s` and replica. What that means: an adapter
deleted (or registered again under its name, with a new version) may still be served as it
was for up to `ttl_s` by a replica that read it just before. A lookup that finds nothing is
not cached: an adapter registered while the cluster runs is served on the next request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from cachetools import TTLCache

from services.catalog.models import PoolConfig
from services.errors import ModelNotFound
from services.inference.router import PoolRouter
from services.pools.engine import AdapterRef
from services.tenancy.adapters import AdapterRecord, AdapterRegistry, parse_adapter_model_id

DEFAULT_TTL_S = 2.0
DEFAULT_MAX_RECORDS = 4096


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    """The pool a model name runs on, and the adapter it runs with (None: the base model)."""

    pool: PoolConfig
    adapter: AdapterRef | None = None


class ModelResolver:
    def __init__(
        self,
        router: PoolRouter,
        adapters: AdapterRegistry | None = None,
        *,
        ttl_s: float = DEFAULT_TTL_S,
        max_records: int = DEFAULT_MAX_RECORDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """`adapters` None: no adapters at all (every `ft:` id is an unknown model)."""
        self._router = router
        self._adapters = adapters
        # (tenant id, adapter name) -> record, for ttl_s on `clock`, least recently used out first
        self._records: TTLCache[tuple[str, str], AdapterRecord] = TTLCache(
            maxsize=max_records, ttl=ttl_s, timer=clock
        )

    async def resolve(self, model: str, *, tenant_id: str | None) -> ResolvedModel:
        """`tenant_id`: the caller's; None (no tenant known) finds plain names only."""
        try:
            return ResolvedModel(self._router.resolve(model))
        except ModelNotFound:
            parsed = parse_adapter_model_id(model)
            if parsed is None or tenant_id is None or self._adapters is None:
                raise
            base, owner, name = parsed
            if owner != tenant_id:  # another tenant's id: refused before any read
                raise
            resolved = await self._adapter(owner, name, base)
            if resolved is None:
                raise
            return resolved

    async def _adapter(self, tenant_id: str, name: str, base: str) -> ResolvedModel | None:
        record = await self._record(tenant_id, name)
        if record is None or record.base_model != base:
            return None
        try:
            pool = self._router.resolve(base)
        except ModelNotFound:
            return None
        if not pool.engine.enable_lora:  # the catalog no longer serves adapters on it
            return None
        return ResolvedModel(pool, AdapterRef(record.id, record.path, record.version))

    async def _record(self, tenant_id: str, name: str) -> AdapterRecord | None:
        key = (tenant_id, name)
        cached = self._records.get(key)
        if cached is not None:
            return cached
        assert self._adapters is not None
        record = await self._adapters.get(tenant_id, name)
        if record is None:  # not cached: a registration shows at once
            self._records.pop(key, None)
            return None
        self._records[key] = record
        return record
