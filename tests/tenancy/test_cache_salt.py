"""Per-tenant prefix-cache salts (issue 9, item 6): unguessable, stable, accepted by vLLM,
and required outside the local profile. The cluster test (tests/gateway/test_prefix_cache.py)
proves the isolation on the real engine."""

from __future__ import annotations

import pytest
from pydantic import SecretStr

from services.settings import Settings
from services.tenancy.cache_salt import CacheSalts

SECRET = "0123456789abcdef-cache-salt"


def test_salts_are_per_tenant_and_keyed_by_the_secret() -> None:
    salts = CacheSalts.from_secret(SECRET)
    a, b = salts.for_tenant("tenant-a"), salts.for_tenant("tenant-b")
    assert a != b
    # Stable across gateway replicas and restarts that share the secret...
    assert CacheSalts.from_secret(SECRET).for_tenant("tenant-a") == a
    # ...and not computable without it (a tenant knows its own id and others').
    assert CacheSalts.from_secret(SECRET + "x").for_tenant("tenant-a") != a
    assert "tenant-a" not in a and SECRET not in a
    assert CacheSalts.from_secret(None).for_tenant("tenant-a") != a  # a per-process secret


def test_salts_fit_vllms_rule_for_any_tenant_id() -> None:
    # vLLM refuses salts over 128 characters or with '@', '/', '\\' or NUL
    # (vllm/entrypoints/generate/base/protocol.py: validate_cache_salt).
    salt = CacheSalts.from_secret(SECRET).for_tenant("t/@\\" * 64)
    assert len(salt) == 64 and set(salt) <= set("0123456789abcdef")


def test_the_secret_is_required_and_real_outside_the_local_profile() -> None:
    admin = SecretStr("a-long-admin-key-0123456789")
    with pytest.raises(ValueError, match="PHISERVE_CACHE_SALT_SECRET is required"):
        Settings(profile="h100", admin_key=admin)
    with pytest.raises(ValueError, match="PHISERVE_CACHE_SALT_SECRET is a placeholder"):
        Settings(profile="h100", admin_key=admin, cache_salt_secret=SecretStr("changeme"))
    assert Settings(profile="h100", admin_key=admin, cache_salt_secret=SecretStr(SECRET)).cache_salt_secret
    assert Settings(profile="local").cache_salt_secret is None  # `phiserve up` generates one
