"""End-user ids (OpenAI's `user` field), recorded only as keyed hashes (issue 11, item 3).

OpenAI asks applications to send a stable id of their end user with each request, so that
abuse can be traced to one user of a tenant. phiserve writes it on each generation's log
line (services/inference/gate.py), but never the raw value: applications send e-mail
addresses and account ids there. A plain hash of a guessable id is reversed by hashing a
list of candidates; an HMAC keyed by a server secret cannot be computed without the secret.

The key is the cache-salt secret (`Settings.cache_salt_secret`), with a domain tag in the
message, so an end-user id can never equal a tenant's cache salt made with the same key.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

# Separates these HMACs from the cache salts (HMAC of the bare tenant id, same key).
_DOMAIN = b"phiserve end-user id\x00"
PREFIX = "eu-"


class EndUserIds:
    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the end-user id secret must be at least 16 bytes")
        self._secret = secret

    @classmethod
    def from_secret(cls, secret: str | None) -> EndUserIds:
        """`Settings.cache_salt_secret`'s value. Without one (the local profile only, see
        `CacheSalts.from_secret`) a per-process secret: ids stay unreadable, but another
        gateway replica writes the same user under another id."""
        return cls(secret.encode() if secret is not None else secrets.token_bytes(32))

    def digest(self, user: str | None) -> str | None:
        """The id logs carry for `user`: 128 bits of its HMAC, as hex; None for none."""
        if not user:
            return None
        mac = hmac.new(self._secret, _DOMAIN + user.encode(), hashlib.sha256)
        return PREFIX + mac.hexdigest()[:32]
