"""Batches: create (validate, reserve quota, enqueue), read, list, cancel, and finalize.

A batch is a Redis hash with live counts. Redis is shared by every tenant (issue 9,
item 2), so a tenant has a quota of unfinished batches and queued items, and a batch's
items are added in chunks of `enqueue_chunk` (one MULTI each, never one giant transaction
that stalls Redis). Until the last chunk is in, the record says `validating` and workers
hold its items untried; a create that fails part of the way removes what it added, and
one whose process died is failed by the sweep after `STALE_VALIDATING_S`.

Finalizing is idempotent (deterministic output file ids, a short lock), so any worker may
do it and a worker that dies while doing it is simply followed by the next sweep. It
moves the results out of Redis into the output and error files, frees the tenant's quota,
and lets the record expire after `retention_s`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any

from services.batch.files import FileService, parse_batch_jsonl
from services.batch.queue import add_items
from services.batch.quotas import Quota, TenantQuotas
from services.errors import InvalidRequest, ModelNotFound, ResourceNotFound
from services.inference.adapter_models import ModelResolver
from services.inference.errors import batch_error_line
from services.inference.protocol.batches import (
    BATCH_ENDPOINTS,
    BatchErrors,
    BatchObject,
    BatchStatus,
    CreateBatchRequest,
    RequestCounts,
)
from services.redis_store import EntryFields, RedisStore, keys, text_hash, text_set, texts

COMPLETION_WINDOW_S = 24 * 3600
FINALIZE_LOCK_S = 120
STALE_VALIDATING_S = 600  # a create still enqueueing after this long has died

logger = logging.getLogger(__name__)


def output_line(item_id: str, custom_id: str, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": item_id,
        "custom_id": custom_id,
        "response": {"status_code": 200, "request_id": item_id, "body": body},
        "error": None,
    }


class BatchService:
    def __init__(
        self,
        store: RedisStore,
        files: FileService,
        models: ModelResolver,
        *,
        max_active: int = 10,
        max_queued_items: int = 50_000,
        enqueue_chunk: int = 500,
        retention_s: float = 7 * 24 * 3600,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._redis = store.redis
        self._files = files
        self._models = models
        self._quotas = TenantQuotas(store)
        self._quota = Quota(max_active, max_queued_items, "unfinished batches", "queued items")
        self._enqueue_chunk = enqueue_chunk
        self._retention_s = retention_s
        self._clock = clock

    async def create(self, tenant_id: str, req: CreateBatchRequest) -> BatchObject:
        if req.endpoint not in BATCH_ENDPOINTS:
            raise InvalidRequest(f"endpoint must be one of {', '.join(BATCH_ENDPOINTS)}", param="endpoint")
        file = await self._files.get(tenant_id, req.input_file_id)
        if file.purpose != "batch":
            raise InvalidRequest(
                "input_file_id must name a file uploaded with purpose=batch", param="input_file_id"
            )
        items = await parse_batch_jsonl(await self._files.content(tenant_id, file.id), max_lines=10**9)
        mismatched = [i["line"] for i in items if i["url"] != req.endpoint]
        if mismatched:
            raise InvalidRequest(
                f"lines {mismatched[:5]} have a url other than the batch endpoint {req.endpoint}",
                param="endpoint",
            )
        if len(items) > self._quota.max_sum:
            raise InvalidRequest(
                f"the batch has {len(items)} requests; a tenant's unfinished batches may hold "
                f"{self._quota.max_sum} in all",
                param="input_file_id",
            )
        batch_id = f"batch_{secrets.token_hex(12)}"
        quota_key = keys.tenant_active_batches(tenant_id)
        await self._quotas.reserve(quota_key, batch_id, len(items), self._quota)
        added: dict[str, list[str]] = {}
        try:
            unroutable = await self._enqueue(tenant_id, batch_id, file.id, req, items, added)
        except BaseException:
            # Shielded: a client that leaves mid-create must not leave half a batch.
            await asyncio.shield(self._discard(tenant_id, batch_id, added))
            raise
        if unroutable == len(items):
            await self.finalize(batch_id)
        return await self.get(tenant_id, batch_id)

    async def _enqueue(
        self,
        tenant_id: str,
        batch_id: str,
        file_id: str,
        req: CreateBatchRequest,
        items: list[dict[str, Any]],
        added: dict[str, list[str]],
    ) -> int:
        """Record (not ready), items chunk by chunk (ids noted in `added`), then ready."""
        now = int(self._clock())
        record: EntryFields = {
            "id": batch_id,
            "tenant_id": tenant_id,
            "endpoint": req.endpoint,
            "input_file_id": file_id,
            "completion_window": req.completion_window,
            "status": BatchStatus.validating.value,
            "created_at": now,
            "expires_at": now + COMPLETION_WINDOW_S,
            "total": len(items),
            "completed": 0,
            "failed": 0,
            "metadata": json.dumps(req.metadata or {}),
        }
        async with self._store.pipeline() as pipe:
            pipe.hset(keys.batch_record(batch_id), mapping=record)
            # Millisecond scores: batches created within one second still list in order.
            pipe.zadd(keys.tenant_batches(tenant_id), {batch_id: int(self._clock() * 1000)})
            # Entries older than any record that can still exist (window + retention) go.
            horizon = (self._clock() - COMPLETION_WINDOW_S - self._retention_s) * 1000
            pipe.zremrangebyscore(keys.tenant_batches(tenant_id), "-inf", horizon)
            pipe.sadd(keys.ACTIVE_BATCHES, batch_id)
            await pipe.execute()
        unroutable = 0
        for start in range(0, len(items), self._enqueue_chunk):
            by_pool: dict[str, list[dict[str, Any]]] = {}
            refused: dict[int, str] = {}
            for item in items[start : start + self._enqueue_chunk]:
                try:
                    # The tenant's own adapters (`ft:` ids) resolve too, to their base's pool.
                    resolved = await self._models.resolve(item["body"]["model"], tenant_id=tenant_id)
                except ModelNotFound as exc:
                    # Refused item by item, as OpenAI does: the rest of the batch runs.
                    line = batch_error_line(f"{batch_id}-{item['line']}", item["custom_id"], exc)
                    refused[item["line"]] = json.dumps({"ok": False, "line": line})
                    continue
                by_pool.setdefault(resolved.pool.name, []).append(item)
            if refused:
                async with self._store.pipeline() as pipe:
                    for number, result in refused.items():
                        pipe.hsetnx(keys.batch_results(batch_id), number, result)
                    await pipe.execute()
                unroutable += len(refused)
            # One call per pool, all of the chunk's items or none (enqueue_items.lua).
            for pool_name, pool_items in by_pool.items():
                ids = await add_items(self._store, pool_name, batch_id, pool_items)
                added.setdefault(pool_name, []).extend(ids)
        ready: EntryFields = {
            "status": BatchStatus.in_progress.value,
            "in_progress_at": int(self._clock()),
            "failed": unroutable,
        }
        await self._redis.hset(keys.batch_record(batch_id), mapping=ready)
        return unroutable

    async def _discard(self, tenant_id: str, batch_id: str, added: dict[str, list[str]]) -> None:
        """Undo a create that failed part of the way (best effort: Redis may be the cause;
        then the sweep fails the batch later and workers drop its items)."""
        # One command at a time, no MULTI: under maxmemory Redis refuses anything queued in a
        # transaction, but still runs deletions on their own.
        redis = self._redis
        try:
            for pool, entry_ids in added.items():
                for start in range(0, len(entry_ids), self._enqueue_chunk):
                    await redis.xdel(keys.batch_stream(pool), *entry_ids[start : start + self._enqueue_chunk])
            await redis.delete(keys.batch_record(batch_id), keys.batch_results(batch_id))
            await redis.zrem(keys.tenant_batches(tenant_id), batch_id)
            await redis.srem(keys.ACTIVE_BATCHES, batch_id)
            await redis.hdel(keys.tenant_active_batches(tenant_id), batch_id)
        except Exception as exc:  # noqa: BLE001  # the sweep fails the batch later
            logger.warning("cleaning up batch %s after a failed create: %s", batch_id, exc)

    async def record(self, batch_id: str) -> dict[str, str]:
        return text_hash(await self._redis.hgetall(keys.batch_record(batch_id)))

    async def get(self, tenant_id: str, batch_id: str) -> BatchObject:
        raw = await self.record(batch_id)
        if not raw or raw.get("tenant_id") != tenant_id:
            raise ResourceNotFound(f"No such Batch object: {batch_id}", param="batch_id")
        return _to_object(raw)

    async def list(self, tenant_id: str, *, after: str | None, limit: int) -> tuple[list[BatchObject], bool]:
        if not 1 <= limit <= 100:
            raise InvalidRequest("limit must be between 1 and 100", param="limit")
        ids = texts(await self._redis.zrevrange(keys.tenant_batches(tenant_id), 0, -1))
        if after is not None:
            if after not in ids:
                raise InvalidRequest(f"after: no batch '{after}'", param="after")
            ids = ids[ids.index(after) + 1 :]
        batches: list[BatchObject] = []
        for index, batch_id in enumerate(ids):
            if len(batches) == limit:
                return batches, True
            try:
                batches.append(await self.get(tenant_id, batch_id))
            except ResourceNotFound:  # its record expired after the retention: forget it
                await self._redis.zrem(keys.tenant_batches(tenant_id), batch_id)
        return batches, False

    async def cancel(self, tenant_id: str, batch_id: str) -> BatchObject:
        batch = await self.get(tenant_id, batch_id)
        if batch.status is BatchStatus.validating:
            raise InvalidRequest(
                f"batch {batch_id} is still being created; retry in a moment", param="batch_id"
            )
        if batch.status.final or batch.status is BatchStatus.finalizing:
            raise InvalidRequest(f"batch {batch_id} is already {batch.status.value}", param="batch_id")
        await self._redis.hset(
            keys.batch_record(batch_id),
            mapping={"status": BatchStatus.cancelling.value, "cancelling_at": int(self._clock())},
        )
        return await self.get(tenant_id, batch_id)

    async def finalize(self, batch_id: str) -> None:
        """Write the output and error files and close the batch (idempotent)."""
        raw = await self.record(batch_id)
        if not raw or BatchStatus(raw["status"]).final:
            await self._redis.srem(keys.ACTIVE_BATCHES, batch_id)
            return
        got_lock = await self._redis.set(keys.batch_finalize_lock(batch_id), "1", nx=True, ex=FINALIZE_LOCK_S)
        if not got_lock:
            return
        now = int(self._clock())
        previous = BatchStatus(raw["status"])
        await self._redis.hset(
            keys.batch_record(batch_id),
            mapping={"status": BatchStatus.finalizing.value, "finalizing_at": now},
        )
        results = await self._redis.hgetall(keys.batch_results(batch_id))
        ordered = [json.loads(results[k]) for k in sorted(results, key=int)]
        outputs = [json.dumps(r["line"]) for r in ordered if r["ok"]]
        errors = [json.dumps(r["line"]) for r in ordered if not r["ok"]]
        tenant_id = raw["tenant_id"]
        update: EntryFields = {}
        if outputs:
            out = await self._files.save(
                tenant_id,
                filename=f"{batch_id}_output.jsonl",
                purpose="batch_output",
                data=("\n".join(outputs) + "\n").encode(),
                file_id=f"file-{batch_id}-output",
            )
            update["output_file_id"] = out.id
        if errors:
            err = await self._files.save(
                tenant_id,
                filename=f"{batch_id}_errors.jsonl",
                purpose="batch_output",
                data=("\n".join(errors) + "\n").encode(),
                file_id=f"file-{batch_id}-errors",
            )
            update["error_file_id"] = err.id
        if previous is BatchStatus.validating:  # its create died part of the way
            final = BatchStatus.failed
        elif previous is BatchStatus.cancelling:
            final = BatchStatus.cancelled
        elif raw.get("expiring"):
            final = BatchStatus.expired
        else:
            final = BatchStatus.completed
        update["status"] = final.value
        update[f"{final.value}_at"] = int(self._clock())
        async with self._store.pipeline() as pipe:
            pipe.hset(keys.batch_record(batch_id), mapping=update)
            # The results now live in the files; the record stays readable for a while.
            pipe.delete(keys.batch_results(batch_id))
            pipe.expire(keys.batch_record(batch_id), int(self._retention_s))
            pipe.srem(keys.ACTIVE_BATCHES, batch_id)
            pipe.hdel(keys.tenant_active_batches(tenant_id), batch_id)
            pipe.delete(keys.batch_finalize_lock(batch_id))
            await pipe.execute()

    async def sweep(self) -> None:
        """Expire overdue batches and finish any whose items are all resolved."""
        for batch_id in text_set(await self._redis.smembers(keys.ACTIVE_BATCHES)):
            raw = await self.record(batch_id)
            if not raw:
                await self._redis.srem(keys.ACTIVE_BATCHES, batch_id)
                continue
            status = BatchStatus(raw["status"])
            if status is BatchStatus.validating:
                if int(raw["created_at"]) < self._clock() - STALE_VALIDATING_S:
                    await self.finalize(batch_id)  # failed: workers drop its items
                continue
            if status is BatchStatus.in_progress and int(raw["expires_at"]) < self._clock():
                # Workers now answer its remaining items with batch_expired.
                await self._redis.hset(keys.batch_record(batch_id), "expiring", 1)
            if int(raw["completed"]) + int(raw["failed"]) >= int(raw["total"]):
                await self.finalize(batch_id)


def _to_object(raw: dict[str, str]) -> BatchObject:
    def opt(name: str) -> int | None:
        return int(raw[name]) if raw.get(name) else None

    status = BatchStatus(raw["status"])
    return BatchObject(
        id=raw["id"],
        endpoint=raw["endpoint"],
        errors=BatchErrors() if status is BatchStatus.failed else None,
        input_file_id=raw["input_file_id"],
        completion_window=raw["completion_window"],
        status=status,
        output_file_id=raw.get("output_file_id"),
        error_file_id=raw.get("error_file_id"),
        created_at=int(raw["created_at"]),
        in_progress_at=opt("in_progress_at"),
        expires_at=opt("expires_at"),
        finalizing_at=opt("finalizing_at"),
        completed_at=opt("completed_at"),
        failed_at=opt("failed_at"),
        expired_at=opt("expired_at"),
        cancelling_at=opt("cancelling_at"),
        cancelled_at=opt("cancelled_at"),
        request_counts=RequestCounts(
            total=int(raw["total"]), completed=int(raw["completed"]), failed=int(raw["failed"])
        ),
        metadata=json.loads(raw.get("metadata") or "{}") or None,
    )
