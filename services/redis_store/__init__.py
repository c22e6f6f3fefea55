"""phiserve's one client of Redis: connections, Lua scripts, error translation, key names.

Named `redis_store` (not `redis`, which a reader would take for redis-py itself, and which
would shadow it for anyone running a script from this folder): it is the store that
tenancy state (tenants, keys, rate windows, usage, the fair queue) and the batch queue
(files, batches, item streams, results) live in. Tenancy and batch call it; it imports
neither of them.

* `client.RedisStore`: connection setup (timeouts, keepalive, retries), the blocking
  reads, and the one translation of redis-py errors into `TenancyUnavailable`;
* `scripts.Script`: every Lua script (`lua/`), registered once by the store;
* `keys`: every key name, batch keys included.
* `text`, `texts`, `text_set`, `text_hash`, `EntryFields`, `EntryIds`: the types of replies and
  arguments as mypy should see them (redis-py annotates replies bytes | str even when decoded).
"""

from services.redis_store import keys
from services.redis_store.client import (
    EntryFields,
    EntryIds,
    GroupCreation,
    GroupRead,
    RedisStore,
    StreamEntries,
    text,
    text_hash,
    text_set,
    texts,
)
from services.redis_store.scripts import Script

__all__ = [
    "EntryFields",
    "EntryIds",
    "GroupCreation",
    "GroupRead",
    "RedisStore",
    "Script",
    "StreamEntries",
    "keys",
    "text",
    "text_hash",
    "text_set",
    "texts",
]
