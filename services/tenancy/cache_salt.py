"""Per-tenant prefix-cache salts (issue 9, item 6).

With prefix caching on, a prompt whose first blocks are already cached starts faster. A
tenant that could share cache blocks with another could learn, by timing its first token
(or reading `cached_tokens`), whether that tenant sent a given prompt. vLLM mixes a
request's `cache_salt` into the hash of its first block, so requests with different salts
never share blocks. Every request gets its tenant's salt: an HMAC of the tenant id keyed by
a server secret, so a tenant can neither pick nor compute another tenant's salt. Clients
cannot send one (the wire models forbid the field).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets

logger = logging.getLogger(__name__)


class CacheSalts:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the cache salt secret must be at least 16 bytes")
        self._secret = secret

    @classmethod
    def ephemeral(cls) -> CacheSalts:
        """A random secret for this process only: isolation holds, but another process
        (a second gateway replica, a restart) salts differently and misses the cache."""
        return cls(secrets.token_bytes(32))

    @classmethod
    def from_secret(cls, secret: str | None) -> CacheSalts:
        """`Settings.cache_salt_secret`'s value."""
        if secret is not None:
            return cls(secret.encode())
        # Only the local profile gets here (settings refuse a missing secret elsewhere),
        # and only when the app was built without `phiserve up`, which generates one.
        logger.warning("no cache_salt_secret set: using a per-process one (the prefix cache is shared less)")
        return cls.ephemeral()

    def for_tenant(self, tenant_id: str) -> str:
        # 64 hex characters: within vLLM's 128-character limit, no '@', '/', '\\' or NUL.
        return hmac.new(self._secret, tenant_id.encode(), hashlib.sha256).hexdigest()
