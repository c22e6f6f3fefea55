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
from services.tenancy.models import ApiKeyRecord, AuthStamp, Tenant, TenantsFile

KEY_PREFIX = "psk-"
KEY_ID_BYTES = 8  # 64 bits: 32 gave a birthday collision after ~65,000 keys (issue 9)
LISTED_PREFIX_LENGTH = len(KEY_PREFIX) + 2 * KEY_ID_BYTES  # "psk-<id>": nothing secret
SUPPLIED_PREFIX_LENGTH = 4  # and never more than a quarter of a supplied key
ID_ATTEMPTS = 5
MAX_CACHED_KEYS = 10_000


def hash_key(plain: str) -> str:
    return hashlib.sha256(plain.encode()).hexdigest()


def supplied_key_prefix(plain: str) -> str:
    """What is listed of a key the operator supplied: a short key must not be mostly shown."""
    return plain[: min(SUPPLIED_PREFIX_LENGTH, len(plain) // 4)]


def new_plain_key() -> tuple[str, str]:
    key_id = secrets.token_hex(KEY_ID_BYTES)
    return key_id, f"{KEY_PREFIX}{key_id}-{secrets.token_urlsafe(32)}"


class TenantStore:
    """Tenants and keys. A replica keeps the keys it authenticated, with their tenants, for
    `tenant_cache_ttl_s`, stamped with the auth version they were read at
    (`keys.AUTH_VERSION`, bumped by every revocation and tenant change). A cached key is
    used as is only where its admission checks that stamp in the same atomic step
    (`authenticate(..., checked_at_admission=True)`: the generation routes, issue 12);
    everywhere else one GET of the version confirms it. A revoked key is refused at once."""

    def __init__(
        self, store: RedisStore, *, tenant_cache_ttl_s: float = 0.0, clock: Callable[[], float] = time.time
    ) -> None:
        self._store = store
        self._redis = store.redis
        self._clock = clock
        self._cache_ttl_s = tenant_cache_ttl_s
        # key hash -> (expiry, tenant stamped with that hash and the version read, record)
        self._keys: dict[str, tuple[float, Tenant, ApiKeyRecord]] = {}

    async def put_tenant(self, tenant: Tenant) -> Tenant:
        async with self._store.pipeline() as pipe:
            pipe.set(keys.tenant(tenant.id), tenant.model_dump_json())
            pipe.sadd(keys.TENANT_IDS, tenant.id)
            pipe.incr(keys.AUTH_VERSION)  # cached keys of this tenant are read again
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
        async with self._store.pipeline() as pipe:
            pipe.set(keys.api_key_by_hash(text(digest)), _stored(revoked, text(digest)))
            pipe.incr(keys.AUTH_VERSION)  # every replica's cached copy of the key is stale now
            await pipe.execute()
        return revoked

    async def authenticate(
        self, plain: str | None, *, checked_at_admission: bool = False
    ) -> tuple[Tenant, ApiKeyRecord]:
        """The key's tenant (stamped, see the class) and record. `checked_at_admission`:
        the caller admits the request through enter.lua, which refuses a stale stamp, so a
        cached key costs no round trip here."""
        if not plain:
            raise AuthenticationFailed(
                "Missing API key: send 'Authorization: Bearer <key>' or an 'api-key' header",
                code="missing_api_key",
            )
        digest = hash_key(plain)
        hit = self._keys.get(digest)
        if hit is not None and hit[0] > time.monotonic():
            _, tenant, record = hit
            if checked_at_admission:
                return tenant, record
            stamp = tenant.auth_stamp
            if stamp is not None and text(await self._redis.get(keys.AUTH_VERSION) or "0") == stamp.version:
                return tenant, record
        return await self._load(digest)

    async def reload(self, tenant: Tenant) -> Tenant:
        """Read a cached tenant's key and record again (enter.lua found its stamp stale);
        AuthenticationFailed if the key was revoked or the tenant disabled since."""
        stamp = tenant.auth_stamp
        if stamp is None:
            return tenant
        self._keys.pop(stamp.key_hash, None)
        return (await self._load(stamp.key_hash))[0]

    async def _load(self, digest: str) -> tuple[Tenant, ApiKeyRecord]:
        # The version is read before the records: a change between the two reads leaves
        # an older version on newer records, which the next check only reads again.
        async with self._store.pipeline(transaction=False) as pipe:
            pipe.get(keys.AUTH_VERSION)
            pipe.get(keys.api_key_by_hash(digest))
            version, raw = await pipe.execute()
        if raw is None:
            raise AuthenticationFailed("Incorrect API key provided")
        record, stored_digest = _loaded(raw)
        if not hmac.compare_digest(stored_digest, digest) or record.revoked_at is not None:
            raise AuthenticationFailed("Incorrect API key provided")
        tenant = (await self.get_tenant(record.tenant_id)).stamped(AuthStamp(digest, text(version or "0")))
        if tenant.disabled:
            raise AuthenticationFailed("This API key's tenant is disabled", code="tenant_disabled")
        if self._cache_ttl_s > 0:
            if len(self._keys) >= MAX_CACHED_KEYS:  # only valid keys get here; still bounded
                self._keys.clear()
            self._keys[digest] = (time.monotonic() + self._cache_ttl_s, tenant, record)
        return tenant, record

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
