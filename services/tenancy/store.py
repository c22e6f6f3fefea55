"""Tenants and API keys in Redis. Keys are stored only as SHA-256 hashes.

A key looks like `psk-<key id>-<secret>`: the id (16 hex, 64 random bits, claimed with SET NX
so two keys never share one) is not secret and names the key in listings and revocation; the
secret is 32 random bytes. A key the operator supplies (bootstrap file, demo key) may be short:
its id is random and at most 4 of its characters are listed. Lookups go by hash, and the stored
hash is compared with `hmac.compare_digest` so the comparison itself leaks no timing.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable

from services.errors import AuthenticationFailed, ResourceNotFound, ServiceUnavailable
from services.redis_store import RedisStore, keys, text, texts
from services.tenancy.models import ApiKeyRecord, Tenant, TenantsFile

KEY_PREFIX = "psk-"
KEY_ID_BYTES = 8  # 64 bits: 32 gave a birthday collision after ~65,000 keys (issue 9)
LISTED_PREFIX_LENGTH = len(KEY_PREFIX) + 2 * KEY_ID_BYTES  # "psk-<id>": nothing secret
SUPPLIED_PREFIX_LENGTH = 4  # and never more than a quarter of a supplied key
ID_ATTEMPTS = 5


def hash_key(plain: str) -> str:
    return hashlib.sha256(plain.encode()).hexdigest()


def supplied_key_prefix(plain: str) -> str:
    """What is listed of a key the operator supplied: a short key must not be mostly shown."""
    return plain[: min(SUPPLIED_PREFIX_LENGTH, len(plain) // 4)]


def new_plain_key() -> tuple[str, str]:
    key_id = secrets.token_hex(KEY_ID_BYTES)
    return key_id, f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(32)}"


class TenantStore:
    def __init__(
        self, store: RedisStore, *, tenant_cache_ttl_s: float = 0.0, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._redis = store.redis
        self._clock = clock
        # Tenant records (limits, weight, allowed models) change rarely and are read on
        # every request: a replica keeps each for a second. Keys are looked up every time,
        # so a revocation takes effect at once.
        self._tenant_cache_ttl_s = tenant_cache_ttl_s
        self._tenant_cache: dict[str, tuple[float, Tenant]] = {}

    async def put_tenant(self, tenant: Tenant) -> Tenant:
        async with self._store.pipeline() as pipe:
            pipe.set(keys.tenant(tenant.id), tenant.model_dump_json())
            pipe.sadd(keys.TENANT_IDS, tenant.id)
            await pipe.execute()
        return tenant

    async def get_tenant(self, tenant_id: str) -> Tenant:
        raw = await self._redis.get(keys.tenant(tenant_id))
        if raw is None:
            raise ResourceNotFound(f"no tenant '{tenant_id}'", param="tenant_id")
        return Tenant.model_validate_json(raw)

    async def list_tenants(self) -> list[Tenant]:
        ids = texts(sorted(await self._redis.smembers(keys.TENANT_IDS)))
        if not ids:
            return []
        raws = await self._redis.mget([keys.tenant(i) for i in ids])
        return [Tenant.model_validate_json(raw) for raw in raws if raw is not None]

    async def create_key(
        self, tenant_id: str, *, name: str = "", plain: str | None = None
    ) -> tuple[str, ApiKeyRecord]:
        """Store a new key for the tenant; return the plain key (shown once) and its record."""
        await self.get_tenant(tenant_id)
        for _ in range(ID_ATTEMPTS):
            if plain is None:
                key_id, candidate = new_plain_key()
                prefix = candidate[:LISTED_PREFIX_LENGTH]
            else:
                key_id, candidate, prefix = secrets.token_hex(KEY_ID_BYTES), plain, supplied_key_prefix(plain)
            digest = hash_key(candidate)
            # Claim the id first (SET NX): a taken id is never overwritten, so revoking
            # by id can only ever reach the key that owns it.
            if await self._redis.set(keys.api_key_by_id(key_id), digest, nx=True):
                break
        else:
            raise ServiceUnavailable("could not allocate a unique key id; retry", retry_after_s=1)
        record = ApiKeyRecord(
            id=key_id, tenant_id=tenant_id, prefix=prefix, created_at=int(self._clock()), name=name
        )
        stored = _stored(record, digest)
        if not await self._redis.set(keys.api_key_by_hash(digest), stored, nx=True):
            # The same supplied key is already installed (two replicas bootstrapping at
            # once): the first record stays, this id is given back.
            await self._redis.delete(keys.api_key_by_id(key_id))
            existing = await self._redis.get(keys.api_key_by_hash(digest))
            assert existing is not None  # SET NX refused it, and key records are never deleted
            return candidate, _loaded(existing)[0]
        await self._redis.sadd(keys.tenant_keys(tenant_id), key_id)
        return candidate, record

    async def ensure_key(self, tenant_id: str, plain: str, *, name: str = "") -> ApiKeyRecord:
        """Install a known key (bootstrap); keep its record if it already exists."""
        digest = hash_key(plain)
        existing = await self._redis.get(keys.api_key_by_hash(digest))
        if existing is not None:
            record = _loaded(existing)[0]
            if record.prefix not in (f"{KEY_PREFIX}{record.id}", supplied_key_prefix(plain)):
                # Stored before issue 9 with the key's first 12 characters: list less.
                record = record.model_copy(update={"prefix": supplied_key_prefix(plain)})
                stored = _stored(record, digest)
                await self._redis.set(keys.api_key_by_hash(digest), stored)
            return record
        return (await self.create_key(tenant_id, name=name, plain=plain))[1]

    async def list_keys(self, tenant_id: str) -> list[ApiKeyRecord]:
        await self.get_tenant(tenant_id)
        key_ids = texts(sorted(await self._redis.smembers(keys.tenant_keys(tenant_id))))
        records = []
        for key_id in key_ids:
            record = await self._record_by_id(key_id)
            if record is not None:
                records.append(record)
        return records

    async def revoke_key(self, tenant_id: str, key_id: str) -> ApiKeyRecord:
        record = await self._record_by_id(key_id)
        # Another tenant's key id gets the same answer as a missing one.
        if record is None or record.tenant_id != tenant_id:
            raise ResourceNotFound(f"tenant '{tenant_id}' has no key '{key_id}'", param="key_id")
        revoked = record.model_copy(update={"revoked_at": int(self._clock())})
        digest = await self._redis.get(keys.api_key_by_id(key_id))
        if digest is None:  # the id was given back since _record_by_id read it
            raise ResourceNotFound(f"tenant '{tenant_id}' has no key '{key_id}'", param="key_id")
        await self._redis.set(keys.api_key_by_hash(text(digest)), _stored(revoked, text(digest)))
        return revoked

    async def authenticate(self, plain: str | None) -> tuple[Tenant, ApiKeyRecord]:
        if not plain:
            raise AuthenticationFailed(
                "Missing API key: send 'Authorization: Bearer <key>' or an 'api-key' header",
                code="missing_api_key",
            )
        digest = hash_key(plain)
        raw = await self._redis.get(keys.api_key_by_hash(digest))
        if raw is None:
            raise AuthenticationFailed("Incorrect API key provided")
        record, stored_digest = _loaded(raw)
        if not hmac.compare_digest(stored_digest, digest) or record.revoked_at is not None:
            raise AuthenticationFailed("Incorrect API key provided")
        tenant = await self._cached_tenant(record.tenant_id)
        if tenant.disabled:
            raise AuthenticationFailed("This API key's tenant is disabled", code="tenant_disabled")
        return tenant, record

    async def _cached_tenant(self, tenant_id: str) -> Tenant:
        now = time.monotonic()
        hit = self._tenant_cache.get(tenant_id)
        if hit is not None and hit[0] > now:
            return hit[1]
        tenant = await self.get_tenant(tenant_id)
        if self._tenant_cache_ttl_s > 0:
            self._tenant_cache[tenant_id] = (now + self._tenant_cache_ttl_s, tenant)
        return tenant

    async def bootstrap(self, tenants_file: TenantsFile) -> None:
        """Install tenants and keys from a file; running it again changes nothing."""
        for entry in tenants_file.tenants:
            tenant = Tenant.model_validate(entry.model_dump(exclude={"api_keys"}))
            await self.put_tenant(tenant)
            for plain in entry.api_keys:
                await self.ensure_key(tenant.id, plain, name="bootstrap")

    async def _record_by_id(self, key_id: str) -> ApiKeyRecord | None:
        digest = await self._redis.get(keys.api_key_by_id(key_id))
        if digest is None:
            return None
        raw = await self._redis.get(keys.api_key_by_hash(text(digest)))
        return None if raw is None else _loaded(raw)[0]


def _stored(record: ApiKeyRecord, digest: str) -> str:
    return json.dumps({"record": record.model_dump(), "hash": digest})


def _loaded(raw: str | bytes) -> tuple[ApiKeyRecord, str]:
    data = json.loads(raw)
    return ApiKeyRecord.model_validate(data["record"]), str(data["hash"])
