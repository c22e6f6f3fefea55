"""Tenants' LoRA adapters: their records in Redis and their OpenAI fine-tune style model ids.

An adapter belongs to exactly one tenant. Its model id, `ft:<base model>:<tenant>:<name>`,
names the owner, but ownership is never taken from the id alone: the registry is keyed by
the tenant that asks (`get(tenant_id, name)`), so another tenant's id finds nothing and gets
the same 404 as a model that does not exist (services/inference/adapter_models.py).
"""

from __future__ import annotations

import json
import secrets
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from services.errors import InvalidRequest, ResourceNotFound
from services.redis_store import RedisStore, Script, keys, text, text_hash

ADAPTER_PREFIX = "ft:"
NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,62}$"


def adapter_model_id(base_model: str, tenant_id: str, name: str) -> str:
    return f"{ADAPTER_PREFIX}{base_model}:{tenant_id}:{name}"


def parse_adapter_model_id(model: str) -> tuple[str, str, str] | None:
    """(base model, tenant id, adapter name) of an `ft:` model id, or None for any other name."""
    if not model.startswith(ADAPTER_PREFIX):
        return None
    parts = model[len(ADAPTER_PREFIX) :].split(":")
    if len(parts) != 3 or not all(parts):
        return None
    base, tenant_id, name = parts
    return base, tenant_id, name


class AdapterRegistration(BaseModel):
    """The admin API's body: register a LoRA adapter for a tenant."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(..., pattern=NAME_PATTERN, description="The adapter's name within its tenant.")
    base_model: str = Field(..., description="A served model name (or alias) of a LoRA-enabled pool.")
    source: str = Field(
        ...,
        min_length=1,
        max_length=4096,
        description="The adapter's PEFT folder: a path relative to the adapter store "
        "(settings.adapters_dir), or an absolute path or file:// URI under one of "
        "settings.adapter_roots (a volume every gateway and pool replica mounts).",
    )
    rank: int | None = Field(
        None, ge=1, description="The rank you expect; checked against adapter_config.json's r."
    )


class AdapterRecord(BaseModel):
    """A registered adapter, as stored (one field of the tenant's adapters hash)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    object: Literal["adapter"] = "adapter"
    id: str = Field(..., description="Its model id: ft:<base model>:<tenant>:<name>.")
    tenant_id: str
    name: str
    base_model: str = Field(..., description="The base model's canonical served name.")
    path: str = Field(..., description="The resolved folder the pools load it from.")
    rank: int
    target_modules: list[str]
    created_at: int
    version: str = Field(..., description="Changes on every registration under this name.")


def new_record(
    tenant_id: str, name: str, *, base_model: str, path: str, rank: int, target_modules: list[str]
) -> AdapterRecord:
    return AdapterRecord(
        id=adapter_model_id(base_model, tenant_id, name),
        tenant_id=tenant_id,
        name=name,
        base_model=base_model,
        path=path,
        rank=rank,
        target_modules=sorted(target_modules),
        created_at=int(time.time()),
        version=secrets.token_hex(6),
    )


class AdapterRegistry:
    """One Redis hash per tenant: adapter name -> JSON record. The per-tenant cap and the
    name's uniqueness are checked in the same atomic step as the write."""

    def __init__(self, store: RedisStore) -> None:
        self._store = store
        self._redis = store.redis

    async def register(self, record: AdapterRecord, *, max_adapters: int) -> AdapterRecord:
        outcome = await self._store.script(
            Script.REGISTER_ADAPTER,
            keys=[keys.tenant_adapters(record.tenant_id)],
            args=[record.name, record.model_dump_json(), max_adapters],
        )
        if int(outcome) == -1:
            raise InvalidRequest(
                f"tenant '{record.tenant_id}' already has an adapter named '{record.name}'; "
                "delete it first or pick another name",
                param="name",
                code="adapter_exists",
            )
        if int(outcome) == -2:
            raise InvalidRequest(
                f"tenant '{record.tenant_id}' has its limit of {max_adapters} registered adapters; "
                "delete one first",
                param="name",
                code="adapter_limit_reached",
            )
        return record

    async def get(self, tenant_id: str, name: str) -> AdapterRecord | None:
        raw = await self._redis.hget(keys.tenant_adapters(tenant_id), name)
        return AdapterRecord.model_validate(json.loads(text(raw))) if raw else None

    async def list(self, tenant_id: str) -> list[AdapterRecord]:
        raw = text_hash(await self._redis.hgetall(keys.tenant_adapters(tenant_id)))
        records = [AdapterRecord.model_validate(json.loads(value)) for value in raw.values()]
        return sorted(records, key=lambda record: record.name)

    async def delete(self, tenant_id: str, name: str) -> AdapterRecord:
        record = await self.get(tenant_id, name)
        removed = await self._redis.hdel(keys.tenant_adapters(tenant_id), name)
        if record is None or not removed:
            raise ResourceNotFound(f"No adapter named '{name}'", param="name", code="adapter_not_found")
        return record
