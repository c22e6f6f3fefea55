"""Every Redis key phiserve uses (tenancy, fair queue, batch), in one place.

`{...}` parts are ids, never secrets. Lua scripts get every key they touch from these
functions, through KEYS; none builds a key name of its own.
"""

from __future__ import annotations

PREFIX = "phiserve"

TENANT_IDS = f"{PREFIX}:tenants"  # set of tenant ids
# Counter bumped by every key revocation and tenant change: a gateway's cached keys are
# good while it is unchanged, and enter.lua checks it with each admission (issue 12).
AUTH_VERSION = f"{PREFIX}:auth-version"


def tenant(tenant_id: str) -> str:  # string: the tenant's JSON record
    return f"{PREFIX}:tenant:{tenant_id}"


def tenant_keys(tenant_id: str) -> str:  # set of the tenant's key ids
    return f"{PREFIX}:tenant:{tenant_id}:keys"


def api_key_by_hash(key_hash: str) -> str:  # string: JSON ApiKeyRecord, looked up on auth
    return f"{PREFIX}:apikey:{key_hash}"


def api_key_by_id(key_id: str) -> str:  # string: the key's hash, for revocation by id
    return f"{PREFIX}:apikeyid:{key_id}"


def tenant_adapters(tenant_id: str) -> str:  # hash adapter name -> JSON AdapterRecord
    return f"{PREFIX}:tenant:{tenant_id}:adapters"


# Admission state, per tenant. The rate windows are hashes of per-second buckets.
def requests_window(tenant_id: str) -> str:
    return f"{PREFIX}:rl:{tenant_id}:req"


def tokens_window(tenant_id: str) -> str:
    return f"{PREFIX}:rl:{tenant_id}:tok"


def concurrency_leases(tenant_id: str) -> str:  # zset lease id -> expiry (ms)
    return f"{PREFIX}:conc:{tenant_id}"


def daily_tokens(tenant_id: str, day: str) -> str:  # integer: tokens reserved + billed that day
    return f"{PREFIX}:budget:{tenant_id}:{day}"


def settled(tenant_id: str, lease_id: str) -> str:  # string, short TTL: the request is settled
    return f"{PREFIX}:settled:{tenant_id}:{lease_id}"


# Usage is indexed by tenant (issue 9): a tenant's report reads only its own keys.
def tenant_usage(tenant_id: str, day: str) -> str:  # hash "<model>|<field>" -> count
    return f"{PREFIX}:usage:tenant:{tenant_id}:{day}"


def usage_tenants(day: str) -> str:  # set of tenant ids with usage that day (admin view)
    return f"{PREFIX}:usage:day:{day}:tenants"


# Fair queue, per pool.
def pool_in_flight(pool: str) -> str:  # zset grant id -> lease expiry (ms)
    return f"{PREFIX}:fq:{pool}:inflight"


def pool_waiting(pool: str) -> str:  # zset ticket id -> score (class, virtual start)
    return f"{PREFIX}:fq:{pool}:waiting"


def pool_tickets(pool: str) -> str:  # hash waiting ticket id -> "<virtual start>|<tenant>"
    return f"{PREFIX}:fq:{pool}:tickets"


def pool_ticket_leases(pool: str) -> str:  # zset waiting ticket id -> lease expiry (ms)
    return f"{PREFIX}:fq:{pool}:ticketleases"


def pool_tenant_waiting(pool: str) -> str:  # hash tenant id -> tickets it has waiting
    return f"{PREFIX}:fq:{pool}:tenantwaiting"


def pool_virtual_time(pool: str) -> str:  # hash: "vt" -> pool virtual time, tenant -> last finish
    return f"{PREFIX}:fq:{pool}:vt"


def ticket_grant(pool: str, ticket_id: str) -> str:  # list the waiter BLPOPs on
    return f"{PREFIX}:fq:{pool}:grant:{ticket_id}"


# Batch API: files, batches, the per-pool item streams and idempotent results.
BATCH_GROUP = "batch-workers"  # the consumer group on every pool's item stream
ACTIVE_BATCHES = f"{PREFIX}:batches:active"  # set of batch ids not yet final


def file_record(file_id: str) -> str:  # string: JSON FileObject + owner
    return f"{PREFIX}:file:{file_id}"


def tenant_files(tenant_id: str) -> str:  # zset file id -> created_at
    return f"{PREFIX}:tenant:{tenant_id}:files"


def batch_record(batch_id: str) -> str:  # hash: the batch's fields and live counts
    return f"{PREFIX}:batch:{batch_id}"


def tenant_batches(tenant_id: str) -> str:  # zset batch id -> created_at
    return f"{PREFIX}:tenant:{tenant_id}:batches"


# Per-tenant quotas (issue 9, item 2): hashes whose entries are counted and summed.
def tenant_active_batches(tenant_id: str) -> str:  # hash unfinished batch id -> its item count
    return f"{PREFIX}:tenant:{tenant_id}:active-batches"


def tenant_file_bytes(tenant_id: str) -> str:  # hash stored file id -> its size in bytes
    return f"{PREFIX}:tenant:{tenant_id}:file-bytes"


def batch_results(batch_id: str) -> str:  # hash line number -> result JSON (HSETNX: once)
    return f"{PREFIX}:batch:{batch_id}:results"


def batch_finalize_lock(batch_id: str) -> str:  # SET NX EX: one finalizer at a time
    return f"{PREFIX}:batch:{batch_id}:finalizing"


def batch_stream(pool: str) -> str:  # stream of items for a pool
    return f"{PREFIX}:batchq:{pool}"
