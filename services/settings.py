"""The one place phiserve reads environment variables.

`Settings()` is built once, in the CLI's `main()` (or by a test), and passed down.
Every variable is `PHISERVE_<FIELD>` in upper case, e.g. `PHISERVE_PORT=9000`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_CACHE_DIR = Path(".cache")
LOCAL_PROFILE = "local"
PLACEHOLDER_SECRETS = {"changeme", "change-me", "admin", "secret", "password", "test"}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PHISERVE_", frozen=True, extra="ignore")

    profile: str = Field(
        "local",
        description="Model catalog profile: a name under services/catalog/profiles "
        "(local, h100, h100-fp8) or a path to a catalog YAML file.",
    )
    cache_dir: Path = Field(
        DEFAULT_CACHE_DIR,
        description="Where tiny models and other local artefacts are cached (git-ignored).",
    )
    host: str = Field("127.0.0.1", description="Address the HTTP gateway binds to.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the gateway.")
    grpc_port: int | None = Field(
        9000,
        ge=1,
        le=65535,
        description="gRPC port served by every gateway replica (SO_REUSEPORT, so replicas "
        "on one node share it); null turns gRPC off.",
    )
    gateway_replicas: int = Field(1, ge=1, description="Number of gateway ingress replicas.")
    gateway_resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each gateway and batch-worker replica requires (they "
        "need no CPU). The Helm chart sets one that only worker groups advertise, so these "
        "tenant-facing replicas never run on the Ray head (GCS, Serve controller). Empty: any node.",
    )
    pool_placement: Literal["any_node", "pool_nodes"] = Field(
        "any_node",
        description="`pool_nodes`: every pool replica requires one unit of the Ray resource "
        "`phiserve_pool_<name>`, which only that pool's nodes advertise (the chart's worker "
        "groups, the pool nodes of `phiserve up --nodes N`); services/catalog/placement.py. "
        "`any_node`: a replica runs wherever its CPUs and GPUs fit.",
    )
    max_request_body_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="Largest body of a generation request (chat, completions: base64 images "
        "make them large) and of a gRPC message; larger bodies get 413 before they are read.",
    )
    max_json_body_bytes: int = Field(
        256 * 1024,
        ge=1024,
        description="Largest body of the other JSON routes (batches, admin): a batch request "
        "with full metadata is ~10 KB. Larger bodies get 413 before they are read. Batch input "
        "files have their own limit (max_batch_file_bytes).",
    )
    grpc_max_concurrent_rpcs: int = Field(
        256,
        ge=1,
        description="RPCs one gateway replica's gRPC server runs at once; more are refused "
        "with RESOURCE_EXHAUSTED before their message is read.",
    )
    ready_cache_ttl_s: float = Field(
        1.0,
        ge=0,
        description="How long a gateway replica reuses its /ready answer (a round trip to "
        "every pool), so a flood of unauthenticated probes never reaches the pools.",
    )
    allow_remote_image_urls: bool = Field(
        False,
        description="Fetch http(s) image URLs in chat messages. Off: only base64 data: URLs.",
    )
    remote_image_timeout_s: float = Field(
        10.0, gt=0, description="Timeout for fetching one remote image when allowed."
    )
    pool_ready_timeout_s: float = Field(
        3.0,
        gt=0,
        description="How long /ready and request routing wait for a pool replica to answer "
        "before reporting the pool unavailable (503).",
    )
    ray_address: str | None = Field(
        None, description="Ray cluster to join; unset starts a local Ray instance."
    )
    metrics_export_port: int = Field(
        8080, ge=1, le=65535, description="Ray's metrics port on a locally started Ray (scrape target)."
    )
    proxy_mode: Literal["haproxy", "default", "direct"] = Field(
        "haproxy",
        description="Ray Serve's front door on a locally started Ray: HAProxy in front of "
        "direct-ingress gateway replicas (least CPU per request), Serve's Python proxy, or "
        "direct ingress alone. See services/ray_env.py and docs/benchmarks.md.",
    )
    serve_throughput_optimized: bool = Field(
        False,
        description="Ray Serve's throughput-optimized mode on a locally started Ray (gRPC between "
        "deployments, user code on each replica's event loop): less CPU per request, but with it "
        "a unary request whose client left was not always cancelled (docs/benchmarks.md, issue 12).",
    )
    ray_num_cpus: int | None = Field(None, ge=1, description="CPUs for a locally started Ray (default: all).")

    redis_url: str = Field(
        "redis://127.0.0.1:6390/0",
        description="Redis holding tenants, keys, limits and usage. The default is the "
        "private Redis that `phiserve up` starts in the local profile (not the system one).",
    )
    admin_key: SecretStr | None = Field(
        None,
        description="Key for /admin routes. Required outside the local profile, where "
        "`phiserve up` generates and prints one when unset.",
    )
    api_key: SecretStr | None = Field(
        None,
        description="Local profile only: the demo tenant's API key (generated and printed when unset).",
    )
    cache_salt_secret: SecretStr | None = Field(
        None,
        description="Secret keying each tenant's prefix-cache salt (HMAC-SHA256 of the tenant "
        "id), so no tenant can hit, or time, another tenant's cached prompt. Required outside "
        "the local profile (at least 16 characters, e.g. `openssl rand -hex 32`); keep it stable "
        "across restarts and replicas, or the cache is cold. `phiserve up` generates one locally.",
    )
    tenants_file: Path | None = Field(
        None, description="YAML of tenants (and keys) installed idempotently at start-up."
    )
    fail_open_limits: bool = Field(
        False,
        description="When tenant state cannot be written (Redis refusing writes at maxmemory, "
        "or lost between authentication and admission), admit authenticated requests without "
        "rate limits and without the fair queue. Authentication always fails closed: with "
        "Redis unreachable no key can be checked, so every request gets 503 whatever this says.",
    )
    queue_timeout_s: float = Field(
        30.0, gt=0, description="Longest wait in the fair queue before 429 overloaded."
    )
    queue_policy: Literal["fair", "fcfs"] = Field(
        "fair",
        description="Order of waiting requests: fair (priority class, then token-weighted "
        "fair queueing between tenants) or fcfs (arrival order; a baseline for benchmarks).",
    )
    max_waiting_per_pool: int = Field(
        2000, ge=1, description="Requests that may wait per pool; more get 429 at once."
    )
    max_waiting_per_tenant: int = Field(
        256,
        ge=1,
        description="Requests one tenant may have waiting per pool; more get 429 "
        "rate_limit_exceeded at once, so no tenant fills the pool's waiting room.",
    )
    queue_ticket_ttl_s: float = Field(
        10.0,
        gt=0,
        description="Lease of a waiting request's place in the fair queue, renewed by its waiter "
        "three times per lease; a waiter that died (its process killed) loses its place, and any "
        "grant pushed to it, within this time.",
    )
    tenant_cache_ttl_s: float = Field(
        1.0,
        ge=0,
        description="How long a gateway replica reuses an authenticated key and its tenant "
        "record (limits, weight) before reading them again. Revocations and tenant changes "
        "apply at once regardless: they bump an auth version that every admission checks.",
    )
    adapter_cache_ttl_s: float = Field(
        2.0,
        ge=0,
        description="How long a gateway replica reuses a tenant's adapter record it read (issue "
        "14): a deleted or re-registered adapter may be served as it was for up to this long.",
    )
    lease_ttl_s: float = Field(
        60.0, ge=5, description="Concurrency and queue leases expire after this unless renewed."
    )

    files_dir: Path | None = Field(
        None, description="Where Batch API files are stored (default: <cache_dir>/files)."
    )
    adapters_dir: Path | None = Field(
        None,
        description="The adapter store: LoRA adapter folders registered by a relative source "
        "(default: <cache_dir>/adapters). Every gateway and pool replica must read it.",
    )
    adapter_roots: list[Path] = Field(
        default_factory=list,
        description="Other folders an adapter may be registered from by absolute path or "
        "file:// URI (mounted volumes). Anything outside them and the store is refused.",
    )
    max_adapter_bytes: int = Field(
        1024**3,
        ge=1024,
        description="Largest adapter_model.safetensors accepted: registration reads all of it "
        "to check its values (a rank-64 adapter of every Phi-3.5-mini linear layer is ~200 MB).",
    )
    max_batch_file_bytes: int = Field(
        64 * 1024 * 1024, ge=1024, description="Largest batch input file accepted."
    )
    max_batch_lines: int = Field(50_000, ge=1, description="Most requests in one batch file.")
    batch_workers: int = Field(
        1, ge=0, description="Batch worker replicas at least (0: no batch processing)."
    )
    batch_max_workers: int = Field(
        4, ge=1, description="Batch worker replicas at most, when the streams are long."
    )
    batch_items_per_worker: int = Field(
        256, ge=1, description="Waiting batch items per worker replica the autoscaler aims for."
    )
    batch_concurrency: int = Field(
        32, ge=1, description="Items one worker keeps in flight (waiting for pool capacity)."
    )
    batch_pool_share: float = Field(
        0.25,
        gt=0,
        le=1,
        description="Share of a pool's capacity one batch worker's items may generate in at "
        "once: the rest stays free for interactive requests, which would otherwise wait for a "
        "batch generation to end (issue 12: TTFT p50 4.7x with a batch filling the pool).",
    )
    batch_visibility_timeout_s: float = Field(
        60.0, ge=1, description="An item of a worker silent this long is reclaimed by another."
    )
    batch_max_attempts: int = Field(3, ge=1, description="Tries of a retryable failure per item.")
    batch_retry_backoff_s: float = Field(1.0, gt=0, description="First retry delay; doubles.")
    batch_sweep_interval_s: float = Field(
        2.0, gt=0, description="How often workers reclaim, expire and finalize batches."
    )
    batch_retry_max_backoff_s: float = Field(
        30.0,
        gt=0,
        description="Longest wait between two tries of a batch item (jittered "
        "exponential backoff, also while the pool is overloaded).",
    )
    batch_max_deliveries: int = Field(
        5,
        ge=1,
        description="An item handed to workers this many times without a result (its "
        "worker kept dying on it) goes to the error file as max_deliveries_exceeded.",
    )
    batch_loop_stall_s: float = Field(
        120.0,
        gt=0,
        description="A batch worker whose loop has not turned for this long "
        "reports unhealthy (Serve replaces it).",
    )
    batch_enqueue_chunk: int = Field(
        500,
        ge=1,
        description="Batch items added to the streams per Redis transaction (a "
        "large batch is enqueued in several; workers run none until all are in).",
    )
    batch_retention_s: float = Field(
        7 * 24 * 3600.0,
        gt=0,
        description="How long a finished batch's record stays readable "
        "before it expires from Redis (its output and error files stay until deleted).",
    )
    tenant_max_active_batches: int = Field(
        10, ge=1, description="Unfinished batches a tenant may have; more get 429 quota_exceeded."
    )
    tenant_max_queued_items: int = Field(
        50_000,
        ge=1,
        description="Items in a tenant's unfinished batches, all together; a batch "
        "that would go beyond gets 429 quota_exceeded.",
    )
    tenant_max_files: int = Field(
        1000,
        ge=1,
        description="Files a tenant may store (uploads and batch outputs); uploads "
        "beyond get 429 quota_exceeded.",
    )
    tenant_max_file_bytes: int = Field(
        2 * 1024**3,
        ge=1024,
        description="Bytes of files a tenant may store; uploads beyond get 429 quota_exceeded.",
    )

    @model_validator(mode="after")
    def _secrets_outside_local(self) -> Settings:
        if self.profile != LOCAL_PROFILE and self.admin_key is None:
            raise ValueError(
                "PHISERVE_ADMIN_KEY is required outside the local profile; "
                "set it to a long random string (e.g. `openssl rand -hex 32`)"
            )
        if self.admin_key is not None:
            value = self.admin_key.get_secret_value()
            if len(value) < 16 or value.lower() in PLACEHOLDER_SECRETS:
                raise ValueError("PHISERVE_ADMIN_KEY is a placeholder or shorter than 16 characters")
        if self.profile != LOCAL_PROFILE and self.cache_salt_secret is None:
            raise ValueError(
                "PHISERVE_CACHE_SALT_SECRET is required outside the local profile; "
                "set it to a long random string (e.g. `openssl rand -hex 32`)"
            )
        if self.cache_salt_secret is not None:
            value = self.cache_salt_secret.get_secret_value()
            if len(value) < 16 or value.lower() in PLACEHOLDER_SECRETS:
                raise ValueError("PHISERVE_CACHE_SALT_SECRET is a placeholder or shorter than 16 characters")
        return self

    @property
    def model_dir(self) -> Path:
        return self.cache_dir / "models"

    @property
    def batch_files_dir(self) -> Path:
        return (self.files_dir or self.cache_dir / "files").resolve()

    @property
    def adapter_store_dir(self) -> Path:
        return (self.adapters_dir or self.cache_dir / "adapters").resolve()

    @property
    def is_local(self) -> bool:
        return self.profile == LOCAL_PROFILE
