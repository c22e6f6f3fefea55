"""The one place phiserve reads environment variables.

`Settings()` is built once, in the CLI's `main()` (or by a test), and passed down.
Every variable is `PHISERVE_<FIELD>` in upper case, e.g. `PHISERVE_PORT=9000`.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_CACHE_DIR = Path(".cache")


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
    gateway_replicas: int = Field(1, ge=1, description="Number of gateway ingress replicas.")
    max_request_body_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="Largest request body accepted; larger bodies get 413.",
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
    ray_num_cpus: int | None = Field(
        None, ge=1, description="CPUs for a locally started Ray (default: all)."
    )

    @property
    def model_dir(self) -> Path:
        return self.cache_dir / "models"
