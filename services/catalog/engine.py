"""A pool's vLLM engine arguments: the `engine:` block of a catalog pool (services/catalog/models.py)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EngineConfig(StrictModel):
    """vLLM `AsyncEngineArgs` that a pool may set. Names and meanings are vLLM's."""

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weight and activation dtype."
    )
    max_model_len: int = Field(..., ge=16, description="Context window in tokens (prompt + completion).")
    max_num_seqs: int = Field(32, ge=1, description="Most sequences in one continuous batch per replica.")
    max_num_batched_tokens: int | None = Field(
        None, ge=16, description="Token budget of one scheduler step (chunked prefill)."
    )
    enable_chunked_prefill: bool | None = Field(
        None,
        description=(
            "Split long prompts across scheduler steps (vLLM's default: on). Off on the CPU: "
            "there vLLM cannot rewind a seeded sampler for a split prompt and the engine dies."
        ),
    )
    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per replica for TP.")
    distributed_executor_backend: Literal["mp"] | None = Field(
        None,
        description="How vLLM runs a replica's tensor-parallel workers; required with "
        "tensor_parallel_size > 1. mp: worker processes inside the replica, on the GPUs the "
        "replica reserved (ray_actor_options.num_gpus = tensor_parallel_size). vLLM's own "
        "default inside a Ray actor is its Ray executor, whose workers ask Ray for GPUs the "
        "replica already holds and wait for ever.",
    )
    enable_expert_parallel: bool = Field(
        False, description="Shard MoE experts across the TP group (GPU only)."
    )
    quantization: Literal["fp8"] | None = Field(
        None, description="Online weight quantization, e.g. fp8 on H100."
    )
    kv_cache_dtype: Literal["auto", "fp8"] = Field("auto", description="KV cache dtype.")
    gpu_memory_utilization: float = Field(
        0.9, gt=0, le=1, description="Fraction of GPU memory vLLM may use (GPU only)."
    )
    kv_cache_memory_bytes: int | None = Field(
        None, ge=1 << 20, description="Explicit KV cache size; required on the CPU."
    )
    enforce_eager: bool = Field(False, description="Skip torch.compile / CUDA graphs.")
    enable_prefix_caching: bool = Field(True, description="Reuse KV of shared prefixes.")
    scheduling_policy: Literal["fcfs", "priority"] = Field(
        "priority", description="priority: lower request priority values run first."
    )
    trust_remote_code: bool = Field(
        False, description="Load model-folder code (the vision image processor needs it)."
    )
    limit_mm_per_prompt: dict[str, int] | None = Field(
        None, description='Multi-modal items per prompt, e.g. {"image": 1}.'
    )
    mm_processor_kwargs: dict[str, Any] | None = Field(
        None, description='Image processor options, e.g. {"num_crops": 4}.'
    )
    enable_lora: bool = Field(
        False, description="Serve tenants' LoRA adapters on this pool (docs/adapters.md)."
    )
    max_loras: int = Field(4, ge=1, description="LoRA only: adapters one scheduler step may mix (GPU slots).")
    max_cpu_loras: int | None = Field(
        None,
        ge=1,
        description="LoRA only: adapters a replica keeps loaded (least recently used go first); "
        "default max_loras. Also the replica's Serve multiplexing cache size.",
    )
    max_lora_rank: int = Field(16, ge=1, le=512, description="LoRA only: the largest adapter rank.")

    @model_validator(mode="after")
    def _whole_prompts_fit_a_step(self) -> EngineConfig:
        # Without chunked prefill a prompt is prefilled in one step; vLLM refuses to start
        # when the step's budget is below the context window. Say so at catalog load.
        budget = self.max_num_batched_tokens
        if self.enable_chunked_prefill is False and budget is not None and budget < self.max_model_len:
            raise ValueError(
                f"max_num_batched_tokens ({budget}) is below max_model_len ({self.max_model_len}) "
                "with enable_chunked_prefill false; raise max_num_batched_tokens or leave it unset"
            )
        return self

    @model_validator(mode="after")
    def _lora_cache_holds_a_step(self) -> EngineConfig:
        if self.enable_lora and self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) is below max_loras ({self.max_loras}); "
                "raise it or leave it unset"
            )
        return self

    @property
    def adapters_per_replica(self) -> int:
        """Adapters a replica keeps loaded (0: LoRA is off)."""
        if not self.enable_lora:
            return 0
        return self.max_cpu_loras or self.max_loras

    def lora_settings(self) -> tuple[bool, int, int | None, int]:
        return (self.enable_lora, self.max_loras, self.max_cpu_loras, self.max_lora_rank)

    @model_validator(mode="after")
    def _tensor_parallel_executor_is_explicit(self) -> EngineConfig:
        if self.tensor_parallel_size > 1 and self.distributed_executor_backend is None:
            raise ValueError(
                f"tensor_parallel_size {self.tensor_parallel_size} needs distributed_executor_backend: "
                "mp (vLLM's Ray executor inside a Serve replica waits for ever for GPUs the replica holds)"
            )
        return self

    def to_engine_kwargs(self) -> dict[str, Any]:
        kwargs = self.model_dump(exclude_none=True)
        if not self.enable_lora:  # vLLM's defaults; it reads them only with LoRA on
            for name in ("enable_lora", "max_loras", "max_cpu_loras", "max_lora_rank"):
                kwargs.pop(name, None)
        return kwargs
