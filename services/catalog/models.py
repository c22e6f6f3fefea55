"""Typed model catalog: which pools exist, what they serve and how they run.

A catalog is YAML parsed at the edge (`load_catalog`) into these models; everything
downstream takes a `Catalog`. Unknown keys are refused so a typo fails at start-up
with the field's path instead of being silently ignored.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator

from services.catalog.engine import EngineConfig, StrictModel

TINY_MODEL_SCHEME = "tiny:"


class Modality(StrEnum):
    text = "text"
    vision = "vision"


class Platform(StrEnum):
    cpu = "cpu"
    cuda = "cuda"


class AutoscalingConfig(StrictModel):
    min_replicas: int = Field(1, ge=0, description="Fewest replicas kept running.")
    max_replicas: int = Field(1, ge=1, description="Most replicas started under load.")
    target_ongoing_requests: float = Field(
        16, gt=0, description="Ongoing requests per replica the autoscaler aims for."
    )

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingConfig:
        if self.max_replicas < self.min_replicas:
            raise ValueError(
                f"max_replicas ({self.max_replicas}) is below min_replicas "
                f"({self.min_replicas}); raise max_replicas"
            )
        return self


class DeploymentConfig(StrictModel):
    """Ray Serve options of the pool's deployment."""

    num_replicas: int | None = Field(
        1, ge=1, description="Fixed replica count; set to null when autoscaling is used."
    )
    autoscaling: AutoscalingConfig | None = Field(None, description="Autoscale replicas.")
    max_ongoing_requests: int = Field(
        64, ge=1, description="Requests a replica takes before Serve queues them."
    )
    health_check_period_s: float = Field(5, gt=0, description="Seconds between health checks.")
    health_check_timeout_s: float = Field(30, gt=0, description="Health check timeout.")
    graceful_shutdown_timeout_s: float = Field(
        30, ge=0, description="How long a stopping replica finishes in-flight requests."
    )
    ray_actor_options: dict[str, Any] = Field(
        default_factory=lambda: {"num_cpus": 0},
        description="Ray actor options: num_cpus, num_gpus, resources, runtime_env.",
    )

    @model_validator(mode="after")
    def _replicas_xor_autoscaling(self) -> DeploymentConfig:
        if self.autoscaling is not None and self.num_replicas is not None:
            raise ValueError(
                "set either num_replicas or autoscaling, not both (write num_replicas: null to autoscale)"
            )
        if self.autoscaling is None and self.num_replicas is None:
            raise ValueError("set num_replicas or autoscaling")
        return self


class RoutingConfig(StrictModel):
    """How the gateway's Serve handle picks a replica of this pool (Serve's request router)."""

    policy: Literal["least_loaded", "prefix_affinity"] = Field(
        "least_loaded",
        description="least_loaded: Serve's default (power of two choices by queue length). "
        "prefix_affinity: a request goes to the replica that last served the longest prefix "
        "of its prompt within the same tenant (services/pools/prefix_router.py), unless that "
        "replica is busier than the least-loaded one by more than max_imbalance.",
    )
    max_imbalance: int = Field(
        4,
        ge=0,
        description="prefix_affinity only: ongoing requests the affine replica may carry beyond "
        "the least-loaded replica before the request falls back to the least-loaded one.",
    )


class PoolConfig(StrictModel):
    """One model pool: one Ray Serve deployment whose replicas embed vLLM."""

    name: str = Field(..., pattern=r"^[a-z][a-z0-9-]{0,30}$", description="Pool id.")
    modality: Modality = Field(..., description="text, or vision (accepts images).")
    model: str = Field(
        ...,
        description="Hugging Face hub id, a local path, or tiny:<name> for a locally "
        "built tiny model under the cache folder.",
    )
    served_names: list[str] = Field(
        default_factory=list,
        description="Model names clients use; the first is canonical. Empty only for a pool "
        "that is another pool's long_context_pool (reached through that pool's names).",
    )
    aliases: list[str] = Field(default_factory=list, description="Extra names that route to this pool.")
    cost_factor: float = Field(1.0, gt=0, description="Relative price of one token (e.g. MoE > mini).")
    cached_prompt_billing_factor: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of a token's price billed for a prompt token served from the prefix "
        "cache (usage and the tenant's daily budget).",
    )
    cached_prompt_queue_factor: float = Field(
        0.1,
        ge=0,
        le=1,
        description="Share of a token's weight a cached prompt token adds to the tenant's "
        "virtual time in the fair queue.",
    )
    long_context_pool: str | None = Field(
        None,
        description="A pool of the same model with a longer max_model_len. Requests whose "
        "prompt tokens + max_tokens exceed this pool's max_model_len are served there; "
        "clients keep calling this pool's names (length-aware pools, docs/architecture.md).",
    )
    routing: RoutingConfig = Field(
        default_factory=lambda: RoutingConfig.model_validate({}),
        description="Which replica of the pool a request goes to.",
    )
    max_images_per_request: int = Field(
        0, ge=0, description="Images one request may carry (0 for text pools)."
    )
    enabled: bool = Field(True, description="Deploy this pool.")
    max_in_flight: int | None = Field(
        None,
        ge=1,
        description="Requests the fair queue lets into the pool at once; beyond it they wait "
        "in tenant-fair order. Default: live replicas x max_num_seqs (the gateway follows an "
        "autoscaled pool's running replicas; keep target_ongoing_requests below max_num_seqs "
        "so a full pool still asks the autoscaler for more).",
    )
    engine: EngineConfig
    deployment: DeploymentConfig = Field(default_factory=lambda: DeploymentConfig.model_validate({}))
    env: dict[str, str] = Field(
        default_factory=dict, description="Environment variables of the replica process."
    )
    # The long pool's max_model_len, set by `Catalog` on a pool with a long_context_pool.
    _long_context_len: int | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _modality_consistent(self) -> PoolConfig:
        if self.modality is Modality.text and self.max_images_per_request:
            raise ValueError(
                "max_images_per_request must be 0 for a text pool; set modality: vision to accept images"
            )
        if self.modality is Modality.vision and not self.max_images_per_request:
            raise ValueError("a vision pool needs max_images_per_request >= 1")
        gpus = self.deployment.ray_actor_options.get("num_gpus", 0)
        if (
            self.engine.distributed_executor_backend == "mp"
            and gpus
            and gpus != self.engine.tensor_parallel_size
        ):
            raise ValueError(
                f"ray_actor_options.num_gpus ({gpus}) must equal tensor_parallel_size "
                f"({self.engine.tensor_parallel_size}): the mp executor's workers run on the replica's GPUs"
            )
        if self.modality is Modality.vision and self.engine.enable_lora:  # else: vLLM fails at start
            raise ValueError(
                "enable_lora must be off on a vision pool: vLLM 0.32's Phi3VForCausalLM has no LoRA"
            )
        return self

    @property
    def names(self) -> list[str]:
        return [*self.served_names, *self.aliases]

    @property
    def context_len(self) -> int:
        """The context its names offer clients: its long pool's, when it has one."""
        if self.long_context_pool is None or self._long_context_len is None:  # e.g. a model_copy without it
            return self.engine.max_model_len
        return self._long_context_len

    def for_replica(self) -> PoolConfig:
        """What a replica is built from: everything but the deployment's own options.

        Serve restarts replicas whose constructor arguments change; keeping replica counts
        and autoscaling out of them makes scaling a pool a lightweight update that drains
        only the replicas it removes (no restart, no dropped request)."""
        return self.model_copy(update={"deployment": DeploymentConfig.model_validate({})})

    @property
    def capacity(self) -> int:
        """The capacity before any replica count is known: the replicas Serve starts with."""
        return self.capacity_for(None)

    def capacity_for(self, live_replicas: int | None) -> int:
        """Grants the fair queue allows at once with this many replicas running. Never
        max_replicas: an autoscaled pool at its minimum would take far more than its
        replicas can run, bypassing the fair queue into Serve's queue (issue 9)."""
        if self.max_in_flight is not None:
            return self.max_in_flight
        dep = self.deployment
        if live_replicas is None:
            live_replicas = dep.autoscaling.min_replicas if dep.autoscaling else (dep.num_replicas or 1)
        # At least one replica's worth: a pool scaled to zero (or restarting) still lets
        # requests reach Serve, whose queue is what scales it back up.
        return max(live_replicas, 1) * self.engine.max_num_seqs

    def resolve_model_path(self, model_dir: Path) -> str:
        if self.model.startswith(TINY_MODEL_SCHEME):
            return str(model_dir / self.model.removeprefix(TINY_MODEL_SCHEME))
        return self.model


class Catalog(StrictModel):
    platform: Platform = Field(..., description="cpu (vLLM's CPU backend) or cuda.")
    pools: list[PoolConfig] = Field(..., min_length=1, description="The model pools.")

    @field_validator("pools")
    @classmethod
    def _unique_names(cls, pools: list[PoolConfig]) -> list[PoolConfig]:
        seen_pools: set[str] = set()
        seen_names: dict[str, str] = {}
        for pool in pools:
            if pool.name in seen_pools:
                raise ValueError(f"pool name {pool.name!r} is used twice; rename one")
            seen_pools.add(pool.name)
            if not pool.enabled:
                continue
            for name in pool.names:
                if name in seen_names:
                    raise ValueError(
                        f"model name {name!r} is served by pools {seen_names[name]!r} "
                        f"and {pool.name!r}; remove it from one"
                    )
                seen_names[name] = pool.name
        return pools

    @field_validator("pools")
    @classmethod
    def _long_context_pools(cls, pools: list[PoolConfig]) -> list[PoolConfig]:
        by_name = {pool.name: pool for pool in pools}
        long_of: dict[str, str] = {}
        for pool in pools:
            if pool.long_context_pool is None or not pool.enabled:
                continue
            where = f"pool {pool.name!r}: long_context_pool {pool.long_context_pool!r}"
            long = by_name.get(pool.long_context_pool)
            if long is None or not long.enabled:
                raise ValueError(
                    f"{where} is not an enabled pool of this catalog; add it or remove the field"
                )
            if long.long_context_pool is not None:
                raise ValueError(f"{where} has a long_context_pool of its own; one long pool per model")
            if (long.model, long.modality) != (pool.model, pool.modality):
                raise ValueError(f"{where} serves another model; both pools must load the same model")
            if long.engine.max_model_len <= pool.engine.max_model_len:
                raise ValueError(
                    f"{where} has max_model_len {long.engine.max_model_len}, not above this pool's "
                    f"{pool.engine.max_model_len}; raise it or drop the field"
                )
            if long.engine.lora_settings() != pool.engine.lora_settings():
                raise ValueError(
                    f"{where} has other LoRA settings; a model's adapters run on both pools, so "
                    "give both the same enable_lora, max_loras, max_cpu_loras and max_lora_rank"
                )
            if long.name in long_of:
                raise ValueError(f"{where} is already the long pool of {long_of[long.name]!r}")
            long_of[long.name] = pool.name
            pool._long_context_len = long.engine.max_model_len
        for pool in pools:
            if pool.enabled and not pool.served_names and pool.name not in long_of:
                raise ValueError(
                    f"pool {pool.name!r} has no served_names; give it one, or name it as another "
                    "pool's long_context_pool"
                )
        return pools

    @property
    def enabled_pools(self) -> list[PoolConfig]:
        return [pool for pool in self.pools if pool.enabled]

    def long_pool_of(self, pool: PoolConfig) -> PoolConfig | None:
        """The pool serving `pool`'s requests that do not fit its context, if any."""
        if pool.long_context_pool is None:
            return None
        return next(p for p in self.pools if p.name == pool.long_context_pool)

    def front_pool_of(self, pool: PoolConfig) -> PoolConfig:
        """The pool whose names reach `pool`: itself, or the short pool of a long pool."""
        return next((p for p in self.enabled_pools if p.long_context_pool == pool.name), pool)

    def tiny_models(self) -> list[str]:
        names = (
            pool.model.removeprefix(TINY_MODEL_SCHEME)
            for pool in self.enabled_pools
            if pool.model.startswith(TINY_MODEL_SCHEME)
        )
        return list(dict.fromkeys(names))  # a short and a long pool share one model
