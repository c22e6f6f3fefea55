"""Wire models of the admin API."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from services.tenancy.adapters import AdapterRecord
from services.tenancy.models import ApiKeyRecord, Tenant


class CreateKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field("", max_length=100, description="A label for the key.")


class CreatedKey(BaseModel):
    key: str = Field(..., description="The API key. Shown once; only its hash is stored.")
    record: ApiKeyRecord


class TenantList(BaseModel):
    object: str = "list"
    data: list[Tenant]


class KeyList(BaseModel):
    object: str = "list"
    data: list[ApiKeyRecord]


class AdapterList(BaseModel):
    object: str = "list"
    data: list[AdapterRecord] = Field(..., description="The tenant's adapters, by name.")
