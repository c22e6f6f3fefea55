"""Typed tenant records, API key records and the bootstrap file."""

from __future__ import annotations

from enum import Enum
from typing import NamedTuple

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr


class PriorityClass(str, Enum):
    interactive = "interactive"
    standard = "standard"
    batch = "batch"

    @property
    def engine_priority(self) -> int:
        """vLLM request priority: lower values are scheduled first."""
        return _ENGINE_PRIORITY[self]


_ENGINE_PRIORITY = {PriorityClass.interactive: 0, PriorityClass.standard: 1, PriorityClass.batch: 2}


class ImagePolicy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    max_images_per_request: int = Field(1, ge=0, description="Images one request may carry.")
    max_num_crops: int = Field(16, ge=1, le=16, description="Largest num_crops a request may ask.")


class TenantLimits(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    rpm: int | None = Field(None, ge=1, description="Requests per minute (sliding 60 s); null: none.")
    tpm: int | None = Field(
        None, ge=1, description="Prompt + completion tokens per minute (sliding 60 s); null: none."
    )
    max_concurrent: int | None = Field(None, ge=1, description="Requests in flight at once.")
    daily_token_budget: int | None = Field(None, ge=1, description="Tokens per UTC day.")
    max_tokens: int | None = Field(
        None, ge=1, description="Cap on a request's max_tokens (also its default)."
    )
    max_n: int = Field(16, ge=1, le=128, description="Cap on a request's n (choices per prompt).")
    max_adapters: int = Field(
        8, ge=0, le=1000, description="LoRA adapters this tenant may have registered at once."
    )
    max_schema_bytes: int = Field(
        65536,
        ge=0,
        description="Cap on a response_format or tools JSON schema's size: the pool compiles it into a grammar.",
    )


class AuthStamp(NamedTuple):
    key_hash: str
    version: str  # keys.AUTH_VERSION when the key and its tenant were read


class Tenant(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(..., pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$", description="Stable tenant id.")
    name: str = Field("", max_length=200, description="Display name.")
    allowed_models: list[str] = Field(
        default_factory=lambda: ["*"], description='Model names or aliases; ["*"] allows all.'
    )
    limits: TenantLimits = Field(default_factory=lambda: TenantLimits.model_validate({}))
    weight: float = Field(1.0, gt=0, le=1000, description="Fair share against other tenants.")
    priority_class: PriorityClass = Field(PriorityClass.standard, description="Scheduling class.")
    images: ImagePolicy = Field(default_factory=lambda: ImagePolicy.model_validate({}))
    disabled: bool = Field(False, description="A disabled tenant's keys are refused.")
    metrics_label: bool = Field(
        False, description="Label this tenant's metrics with its id (others share 'other')."
    )

    # Which key this record was authenticated with, at which auth version (a tenant read
    # from a gateway's key cache); enter.lua refuses the admission if the version moved.
    _auth: AuthStamp | None = PrivateAttr(default=None)

    def allows(self, model_names: list[str]) -> bool:
        return "*" in self.allowed_models or any(n in self.allowed_models for n in model_names)

    @property
    def auth_stamp(self) -> AuthStamp | None:
        return self._auth

    def stamped(self, stamp: AuthStamp) -> Tenant:
        copy = self.model_copy()
        copy._auth = stamp
        return copy


class ApiKeyRecord(BaseModel):
    """What is stored for a key: never the key itself, only its hash and a short prefix."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    id: str = Field(..., description="Key id, used to list and revoke.")
    tenant_id: str
    prefix: str = Field(..., description="The first characters of the key, not secret.")
    created_at: int = Field(..., description="Unix seconds.")
    revoked_at: int | None = None
    name: str = ""


class BootstrapTenant(Tenant):
    # Keys in the bootstrap file (a Kubernetes Secret in production) are hashed on
    # load; only the hash and a short prefix reach Redis.
    api_keys: list[str] = Field(default_factory=list, description="Plain keys to install.")


class TenantsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    tenants: list[BootstrapTenant] = Field(default_factory=list)
