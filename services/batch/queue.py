"""The batch item queue: one Redis Stream per pool, read by a consumer group.

At-least-once delivery with idempotent results gives exactly-once output:
* items are added with the batch in one MULTI (all or none);
* a worker reads with XREADGROUP and acknowledges an entry only in the same Lua step that
  writes its result (HSETNX per line): a redelivered item is acknowledged, never written
  twice in the output; results finishing together share one call (`ResultWriter`);
* a dead consumer's entries are reclaimed with XAUTOCLAIM after the visibility timeout;
  a live worker keeps its in-flight entries fresh with XCLAIM (same consumer, resets idle);
* a reclaimed entry carries its delivery count (XPENDING), so an item that keeps killing
  its workers can be dead-lettered instead of handed out forever (issue 9, item 8).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson

from services.redis_store import EntryFields, EntryIds, RedisStore, Script, keys, texts


@dataclass(frozen=True)
class QueueItem:
    pool: str
    entry_id: str
    batch_id: str
    line: int
    custom_id: str
    url: str
    body: dict[str, Any]
    deliveries: int = 1  # times Redis handed this entry to a consumer, this one included


def item_fields(batch_id: str, item: dict[str, Any]) -> EntryFields:
    # One field holding the item: one encode per item for redis-py, one decode for workers.
    return {"item": _item_value(batch_id, item)}


def _item_value(batch_id: str, item: dict[str, Any]) -> bytes | str:
    payload = {
        "batch": batch_id,
        "line": item["line"],
        "custom_id": item["custom_id"],
        "url": item["url"],
        "body": item["body"],
    }
    if not item.get("exact_json"):
        return _dumps(payload)
    return json.dumps(payload, separators=(",", ":"))  # NaN / Infinity kept as written


def _dumps(value: Any) -> bytes | str:
    """orjson, ten times json's speed on the queue path (a tenth of an item's cost there);
    json where orjson refuses a value (an integer past 64 bits, a lone surrogate)."""
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS)
    except orjson.JSONEncodeError:
        return json.dumps(value, separators=(",", ":"))


async def add_items(store: RedisStore, pool: str, batch_id: str, items: list[dict[str, Any]]) -> list[str]:
    """Add a chunk of a batch's items to the pool's stream, all or none (one Lua call);
    answers their entry ids in order."""
    values = [_item_value(batch_id, item) for item in items]
    ids = await store.script(Script.ENQUEUE_ITEMS, keys=[keys.batch_stream(pool)], args=values)
    return texts(ids)


def _parse(pool: str, entry_id: str, fields: dict[str, str], deliveries: int = 1) -> QueueItem:
    # json, not orjson: orjson reads an integer past 64 bits as a float, and refuses NaN.
    data = json.loads(fields["item"])
    return QueueItem(
        pool=pool,
        entry_id=entry_id,
        batch_id=data["batch"],
        line=int(data["line"]),
        custom_id=data["custom_id"],
        url=data["url"],
        body=data["body"],
        deliveries=deliveries,
    )


class BatchQueue:
    def __init__(self, store: RedisStore, pools: list[str], *, visibility_timeout_s: float) -> None:
        self._store = store
        self._redis = store.redis
        self._pools = pools
        self._visibility_ms = int(visibility_timeout_s * 1000)

    async def ensure_groups(self) -> None:
        for pool in self._pools:
            await self._store.create_group(keys.batch_stream(pool), keys.BATCH_GROUP)  # or it existed

    async def read(self, consumer: str, *, count: int, block_ms: int) -> list[QueueItem]:
        streams = {keys.batch_stream(pool): ">" for pool in self._pools}
        read = await self._store.read_group(
            keys.BATCH_GROUP, consumer, streams, count=count, block_ms=block_ms
        )
        if read.group_missing:
            await self.ensure_groups()  # Redis lost the group (restart without AOF)
            return []
        return [
            _parse(_pool_of(stream), entry_id, fields)
            for stream, entries in read.streams
            for entry_id, fields in entries
        ]

    async def reclaim(self, consumer: str, *, count: int) -> list[QueueItem]:
        """Take over entries idle longer than the visibility timeout (their worker died)."""
        items: list[QueueItem] = []
        for pool in self._pools:
            reply = await self._redis.xautoclaim(
                keys.batch_stream(pool),
                keys.BATCH_GROUP,
                consumer,
                self._visibility_ms,
                "0-0",
                count=count,
            )
            # Redis 6.2 answers [cursor, entries]; 7.x adds a third element (deleted ids).
            entries = [
                (entry_id, fields) for entry_id, fields in (reply[1] if len(reply) >= 2 else []) if fields
            ]
            counts = await self._deliveries(pool, [entry_id for entry_id, _ in entries])
            items.extend(
                _parse(pool, entry_id, fields, counts.get(entry_id, 1)) for entry_id, fields in entries
            )
        return items

    async def _deliveries(self, pool: str, entry_ids: list[str]) -> dict[str, int]:
        if not entry_ids:
            return {}
        async with self._store.pipeline() as pipe:
            for entry_id in entry_ids:
                pipe.xpending_range(
                    keys.batch_stream(pool), keys.BATCH_GROUP, min=entry_id, max=entry_id, count=1
                )
            replies = await pipe.execute()
        return {row["message_id"]: int(row["times_delivered"]) for reply in replies for row in reply}

    async def drop(self, item: QueueItem) -> None:
        """Acknowledge and delete an entry with nothing to record (its batch is gone or final)."""
        async with self._store.pipeline() as pipe:
            pipe.xack(keys.batch_stream(item.pool), keys.BATCH_GROUP, item.entry_id)
            pipe.xdel(keys.batch_stream(item.pool), item.entry_id)
            await pipe.execute()

    async def touch(self, consumer: str, items: list[QueueItem]) -> None:
        """Reset the idle time of entries this worker is still working on."""
        for pool in {item.pool for item in items}:
            ids: EntryIds = [item.entry_id for item in items if item.pool == pool]
            await self._redis.xclaim(keys.batch_stream(pool), keys.BATCH_GROUP, consumer, 0, ids, justid=True)

    async def record(
        self, item: QueueItem, result: dict[str, Any], *, ok: bool
    ) -> tuple[bool, int, int, int]:
        """Write the result once and ack; returns (new, completed, failed, total)."""
        return (await self.record_many([(item, result, ok)]))[0]

    async def record_many(
        self, results: list[tuple[QueueItem, dict[str, Any], bool]]
    ) -> list[tuple[bool, int, int, int]]:
        """Record several results (one Lua call per pool); answers in the same order."""
        answers: list[tuple[bool, int, int, int]] = [(False, 0, 0, 0)] * len(results)
        for pool in {item.pool for item, _, _ in results}:
            indexed = [(i, r) for i, r in enumerate(results) if r[0].pool == pool]
            # Keys once per batch, and the items' coordinates in one argument: redis-py packs
            # each argument in Python, so fewer of them is most of a burst's client cost.
            batch_numbers: dict[str, int] = {}
            script_keys = [keys.batch_stream(pool)]
            coordinates: list[str] = []
            payloads: list[bytes | str] = []
            for _, (item, result, ok) in indexed:
                number = batch_numbers.get(item.batch_id)
                if number is None:
                    number = batch_numbers[item.batch_id] = len(batch_numbers) + 1
                    script_keys += [keys.batch_record(item.batch_id), keys.batch_results(item.batch_id)]
                outcome = "completed" if ok else "failed"
                coordinates.append(f"{number} {item.line} {outcome} {item.entry_id}")
                payloads.append(_dumps(result))
            reply = await self._store.script(
                Script.RECORD_RESULT,
                keys=script_keys,
                args=[keys.BATCH_GROUP, "\n".join(coordinates), *payloads],
            )
            counts = reply[len(indexed) :]
            for (i, (item, _, _)), new in zip(indexed, reply, strict=False):
                at = 3 * (batch_numbers[item.batch_id] - 1)
                answers[i] = (bool(new), int(counts[at]), int(counts[at + 1]), int(counts[at + 2]))
        return answers

    async def lag_s(self, pool: str, now_ms: float) -> float:
        """Age of the oldest entry still in the pool's stream (acknowledged ones are deleted)."""
        oldest = await self._redis.xrange(keys.batch_stream(pool), count=1)
        if not oldest:
            return 0.0
        return max((now_ms - int(str(oldest[0][0]).split("-")[0])) / 1000, 0.0)

    async def depth(self, pool: str) -> tuple[int, int]:
        """(entries in the stream, entries delivered but not acknowledged)."""
        stream = keys.batch_stream(pool)
        length = await self._redis.xlen(stream)
        try:
            pending = await self._redis.xpending(stream, keys.BATCH_GROUP)
        except Exception:  # noqa: BLE001  # no group yet (or Redis lost it): nothing is pending
            return int(length), 0
        return int(length), int(pending["pending"])


class ResultWriter:
    """Coalesces the results of items finishing within a few milliseconds into one Lua call:
    the same exactly-once step per item, a fraction of the round trips.

    A burst is written at once, without the wait, when it is full or when every item the
    caller has in flight (`in_flight`) is waiting here or being written: then no other
    result can join it."""

    def __init__(
        self,
        queue: BatchQueue,
        *,
        max_batch: int = 64,
        max_delay_s: float = 0.002,
        in_flight: Callable[[], int] | None = None,
    ) -> None:
        self._queue = queue
        self._max_batch = max_batch
        self._max_delay_s = max_delay_s
        self._in_flight = in_flight
        self._pending: list[tuple[QueueItem, dict[str, Any], bool, asyncio.Future[Any]]] = []
        self._writing = 0  # results in calls under way
        self._timer: asyncio.TimerHandle | None = None
        self._calls: set[asyncio.Task[None]] = set()

    async def write(self, item: QueueItem, result: dict[str, Any], *, ok: bool) -> tuple[bool, int, int, int]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        self._pending.append((item, result, ok, future))
        waiting = len(self._pending)
        if waiting >= self._max_batch or (
            self._in_flight is not None and waiting + self._writing >= self._in_flight()
        ):
            self._flush()
        elif self._timer is None:
            self._timer = loop.call_later(self._max_delay_s, self._flush)
        answer: tuple[bool, int, int, int] = await future
        return answer

    def _flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        loop = asyncio.get_running_loop()
        while self._pending:
            taken, self._pending = self._pending[: self._max_batch], self._pending[self._max_batch :]
            self._writing += len(taken)
            call = loop.create_task(self._write(taken))
            self._calls.add(call)  # held until done: the loop keeps only a weak reference
            call.add_done_callback(self._calls.discard)

    async def _write(self, taken: list[tuple[QueueItem, dict[str, Any], bool, asyncio.Future[Any]]]) -> None:
        try:
            answers = await self._queue.record_many([(item, result, ok) for item, result, ok, _ in taken])
        except Exception as exc:  # noqa: BLE001 - not swallowed: every waiter gets it
            for *_, future in taken:
                if not future.done():
                    future.set_exception(exc)
            return
        finally:
            self._writing -= len(taken)
        for (*_, future), answer in zip(taken, answers, strict=True):
            if not future.done():
                future.set_result(answer)


def _pool_of(stream: str) -> str:
    return stream.rsplit(":", 1)[1]
