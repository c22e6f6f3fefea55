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
    ENQUEUE_ITEMS = "enqueue_items"  # batch: add a chunk of items to a pool's stream (all or none)
    ENTER = "enter"  # a generation's way in: auth version, admit, fair-queue acquire
    LEAVE = "leave"  # a generation's way out: settle, fair-queue release
    REGISTER_ADAPTER = "register_adapter"  # adapters: add a tenant's adapter within its cap

    @property
    def parts(self) -> tuple[Script, ...]:
        """The scripts whose bodies this one runs, in the same atomic call."""
        return _PARTS.get(self, ())

    @property
    def path(self) -> Path:
        return LUA_DIR / f"{self.value}.lua"

    def source(self) -> str:
        # Each part becomes a local function of (KEYS, ARGV): its body reads the slices it
        # is given exactly as it reads the call's own KEYS and ARGV when run alone.
        functions = "".join(
            f"local function {part.value}(KEYS, ARGV)\n{part.path.read_text()}end\n\n" for part in self.parts
        )
        return functions + self.path.read_text()


_PARTS = {
    Script.ENTER: (Script.ADMIT, Script.FAIR_QUEUE),
    Script.LEAVE: (Script.SETTLE, Script.FAIR_QUEUE),
}
