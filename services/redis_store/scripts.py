"""Every Lua script phiserve runs, registered in one place.

Each script is one atomic step of tenancy (admission, fair queue) or of the batch queue;
its header says what its KEYS and ARGV are. Every key a script reads or writes arrives in
KEYS, never built inside the script from an ARGV prefix: Redis (and Redis Cluster) can
then see which keys a call touches. `tests/redis_store/test_script_keys.py` runs each
script on a real redis-server and checks this.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

LUA_DIR = Path(__file__).parent / "lua"


class Script(StrEnum):
    """A script's name is its file's stem in `lua/`."""

    ADMIT = "admit"  # admission: RPM, TPM, concurrency lease, daily budget
    SETTLE = "settle"  # admission: settle to actual usage, free the slot, record usage
    RENEW_LEASES = "renew_leases"  # admission: extend running requests' concurrency leases
    FAIR_QUEUE = "fair_queue"  # fair queue: acquire / release / renew, then dispatch
    RECORD_RESULT = "record_result"  # batch: write items' results once and acknowledge them
    RESERVE = "reserve"  # batch: take a place in a per-tenant quota hash

    @property
    def path(self) -> Path:
        return LUA_DIR / f"{self.value}.lua"

    def source(self) -> str:
        return self.path.read_text()
