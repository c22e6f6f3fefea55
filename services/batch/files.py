"""Files of the Batch API: JSONL validation, a storage interface, tenant-owned metadata.

Bytes go to a `FileStore` (a local directory by default; an object store implements the
same four methods). Metadata and ownership live in Redis. Another tenant's file id gets
the same 404 as a missing one. Files are kept until deleted (as OpenAI), so each tenant
has a quota of files and bytes (issue 9, item 2); an upload that fails part of the way
leaves neither a temp file, nor a file without its record, nor a quota place taken.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import tempfile
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.batch.quotas import Quota, TenantQuotas
from services.errors import InvalidRequest, RequestTooLarge, ResourceNotFound, ServiceUnavailable
from services.inference.protocol.batches import (
    BATCH_ENDPOINTS,
    FILE_PURPOSES,
    MAX_FILE_LIST_LIMIT,
    FileListOrder,
    FileObject,
)
from services.redis_store import RedisStore, keys, texts

MAX_CUSTOM_ID_LENGTH = 512
# Deeper than any real request (tool schemas nest ~10 levels); far below the depth where
# json.loads / json.dumps raise RecursionError (issue 9, item 9).
MAX_JSON_DEPTH = 64
ERRORS_SHOWN = 5
UPLOAD_PURPOSES = ("batch",)
LIST_READ_SLICE = 500

logger = logging.getLogger(__name__)


class FileStore(ABC):
    @abstractmethod
    def put(self, owner: str, file_id: str, data: bytes) -> None: ...

    @abstractmethod
    def get(self, owner: str, file_id: str) -> bytes: ...

    @abstractmethod
    def delete(self, owner: str, file_id: str) -> None: ...


class LocalFileStore(FileStore):
    def __init__(self, root: Path) -> None:
        self._root = root

    def _path(self, owner: str, file_id: str) -> Path:
        return self._root / owner / file_id

    def put(self, owner: str, file_id: str, data: bytes) -> None:
        path = self._path(owner, file_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a reader never sees half a file; a failed write (disk full,
        # quota, I/O error) removes its temp file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".upload-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def get(self, owner: str, file_id: str) -> bytes:
        try:
            return self._path(owner, file_id).read_bytes()
        except FileNotFoundError:
            raise ResourceNotFound(f"file '{file_id}' has no content", param="file_id") from None

    def delete(self, owner: str, file_id: str) -> None:
        self._path(owner, file_id).unlink(missing_ok=True)


async def parse_batch_jsonl(data: bytes, *, max_lines: int) -> list[dict[str, Any]]:
    """`validate_batch_jsonl` on a worker thread: parsing up to 64 MiB of JSON takes
    seconds, which on the event loop would stall every request of the replica (issue 9)."""
    return await asyncio.to_thread(validate_batch_jsonl, data, max_lines=max_lines)


def validate_batch_jsonl(data: bytes, *, max_lines: int) -> list[dict[str, Any]]:
    """Parse and check every line; refuse the whole file with the first errors if any."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidRequest("the file is not UTF-8 text", param="file") from None
    items: list[dict[str, Any]] = []
    errors: list[str] = []
    seen: dict[str, int] = {}
    # Only \n ends a line (JSONL): splitlines() would also split on U+2028, U+0085 ... which
    # are valid raw characters inside a JSON string.
    lines = [line.removesuffix("\r") for line in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise InvalidRequest("the file has no lines; each line is one JSON request", param="file")
    if len(lines) > max_lines:
        raise InvalidRequest(f"the file has {len(lines)} lines; the limit is {max_lines}", param="file")
    for number, line in enumerate(lines, start=1):
        problem = _check_line(line, number, seen)
        if isinstance(problem, str):
            errors.append(f"line {number}: {problem}")
        else:
            items.append(problem)
    if errors:
        more = f" (and {len(errors) - ERRORS_SHOWN} more)" if len(errors) > ERRORS_SHOWN else ""
        raise InvalidRequest("invalid batch file: " + "; ".join(errors[:ERRORS_SHOWN]) + more, param="file")
    return items


def _check_line(line: str, number: int, seen: dict[str, int]) -> dict[str, Any] | str:
    try:
        item = json.loads(line)
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg} at column {exc.colno})"
    except RecursionError:
        return f"nested more than {MAX_JSON_DEPTH} levels deep"
    if _depth_exceeds(item, MAX_JSON_DEPTH):
        return f"nested more than {MAX_JSON_DEPTH} levels deep"
    if not isinstance(item, dict):
        return "must be a JSON object"
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id or len(custom_id) > MAX_CUSTOM_ID_LENGTH:
        return f"custom_id must be a non-empty string of at most {MAX_CUSTOM_ID_LENGTH} characters"
    if custom_id in seen:
        return f"custom_id '{custom_id}' appears twice (first on line {seen[custom_id]})"
    seen[custom_id] = number
    if item.get("method") != "POST":
        return 'method must be "POST"'
    if item.get("url") not in BATCH_ENDPOINTS:
        return f"url must be one of {', '.join(BATCH_ENDPOINTS)}"
    body = item.get("body")
    if not isinstance(body, dict) or not isinstance(body.get("model"), str):
        return "body must be a JSON object with a model"
    if body.get("stream"):
        return "streaming is not available in a batch"
    checked = {"line": number, "custom_id": custom_id, "url": item["url"], "body": body}
    if _has_nonfinite(body):
        checked["exact_json"] = True  # the queue encodes it with json, which keeps NaN as written
    return checked


def _has_nonfinite(value: Any) -> bool:
    """NaN or +-Infinity (which Python's json reads): orjson would write them as null."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, float):
            if not math.isfinite(node):
                return True
        elif isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return False


def _depth_exceeds(value: Any, limit: int) -> bool:
    """Iterative (a recursive walk would fail the way the parser does)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


class FileService:
    def __init__(
        self,
        redis_store: RedisStore,
        store: FileStore,
        *,
        max_bytes: int,
        max_lines: int,
        max_files: int = 1000,
        max_stored_bytes: int = 2 * 1024**3,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._redis_store = redis_store
        self._redis = redis_store.redis
        self._store = store
        self._quotas = TenantQuotas(redis_store)
        self._quota = Quota(max_files, max_stored_bytes, "files", "bytes of files")
        self._max_bytes = max_bytes
        self._max_lines = max_lines
        self._clock = clock

    async def upload(self, tenant_id: str, *, filename: str, purpose: str, data: bytes) -> FileObject:
        if purpose not in UPLOAD_PURPOSES:
            raise InvalidRequest(f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}", param="purpose")
        if len(data) > self._max_bytes:
            raise RequestTooLarge(f"the file is larger than {self._max_bytes} bytes", param="file")
        await parse_batch_jsonl(data, max_lines=self._max_lines)
        return await self.save(tenant_id, filename=filename, purpose=purpose, data=data, check_quota=True)

    async def save(
        self,
        tenant_id: str,
        *,
        filename: str,
        purpose: str,
        data: bytes,
        file_id: str | None = None,
        check_quota: bool = False,
    ) -> FileObject:
        """Store and record a file. Uploads check the tenant's quota; a batch's own output
        files are only counted (they must be written for the batch to finish)."""
        file = FileObject(
            id=file_id or f"file-{secrets.token_hex(12)}",
            bytes=len(data),
            created_at=int(self._clock()),
            filename=filename[:255] or "upload.jsonl",
            purpose=purpose,
        )
        quota_key = keys.tenant_file_bytes(tenant_id)
        if check_quota:
            await self._quotas.reserve(quota_key, file.id, file.bytes, self._quota)
        else:
            await self._quotas.record(quota_key, file.id, file.bytes)
        try:
            try:
                await asyncio.to_thread(self._store.put, tenant_id, file.id, data)  # write + fsync
            except OSError as exc:
                logger.error("storing file %s failed: %s", file.id, exc)
                raise ServiceUnavailable(
                    "file storage failed; retry shortly", code="file_storage_unavailable"
                ) from exc
            async with self._redis_store.pipeline() as pipe:
                pipe.set(
                    keys.file_record(file.id), json.dumps({"tenant_id": tenant_id, "file": file.model_dump()})
                )
                pipe.zadd(keys.tenant_files(tenant_id), {file.id: int(self._clock() * 1000)})
                await pipe.execute()
        except BaseException:
            # Shielded: a client that leaves mid-upload must not leave bytes without a record.
            await asyncio.shield(self._discard(tenant_id, file.id))
            raise
        return file

    async def _discard(self, tenant_id: str, file_id: str) -> None:
        try:
            await asyncio.to_thread(self._store.delete, tenant_id, file_id)
            await self._quotas.release(keys.tenant_file_bytes(tenant_id), file_id)
        except Exception as exc:  # noqa: BLE001  # Redis down as well: freed when the file is deleted
            logger.warning("cleaning up file %s failed: %s", file_id, exc)

    async def get(self, tenant_id: str, file_id: str) -> FileObject:
        raw = await self._redis.get(keys.file_record(file_id))
        record = json.loads(raw) if raw else None
        if record is None or record["tenant_id"] != tenant_id:
            raise ResourceNotFound(f"No such File object: {file_id}", param="file_id")
        return FileObject.model_validate(record["file"])

    async def content(self, tenant_id: str, file_id: str) -> bytes:
        await self.get(tenant_id, file_id)
        return await asyncio.to_thread(self._store.get, tenant_id, file_id)

    async def delete(self, tenant_id: str, file_id: str) -> FileObject:
        file = await self.get(tenant_id, file_id)
        async with self._redis_store.pipeline() as pipe:
            pipe.delete(keys.file_record(file_id))
            pipe.zrem(keys.tenant_files(tenant_id), file_id)
            pipe.hdel(keys.tenant_file_bytes(tenant_id), file_id)
            await pipe.execute()
        self._store.delete(tenant_id, file_id)
        return file

    async def list(
        self,
        tenant_id: str,
        *,
        purpose: str | None = None,
        order: FileListOrder = "desc",
        after: str | None = None,
        limit: int = MAX_FILE_LIST_LIMIT,
    ) -> tuple[list[FileObject], bool]:
        """OpenAI's list: by creation time, `after` a file of the tenant's (another tenant's
        id is as unknown as a made-up one), `limit` files and whether more follow."""
        if purpose is not None and purpose not in FILE_PURPOSES:
            raise InvalidRequest(f"purpose must be one of {', '.join(FILE_PURPOSES)}", param="purpose")
        if order not in ("asc", "desc"):
            raise InvalidRequest("order must be 'asc' or 'desc'", param="order")
        if not 1 <= limit <= MAX_FILE_LIST_LIMIT:
            raise InvalidRequest(f"limit must be between 1 and {MAX_FILE_LIST_LIMIT}", param="limit")
        index = keys.tenant_files(tenant_id)
        ids = texts(
            await (
                self._redis.zrange(index, 0, -1) if order == "asc" else self._redis.zrevrange(index, 0, -1)
            )
        )
        if after is not None:
            if after not in ids:
                raise InvalidRequest(f"after: no file '{after}'", param="after")
            ids = ids[ids.index(after) + 1 :]
        files: list[FileObject] = []
        # Records in slices (one round trip each), read only as far as the page needs.
        for start in range(0, len(ids), LIST_READ_SLICE):
            for raw in await self._redis.mget(
                [keys.file_record(i) for i in ids[start : start + LIST_READ_SLICE]]
            ):
                record = json.loads(raw) if raw else None
                if record is None or record["tenant_id"] != tenant_id:
                    continue  # deleted meanwhile
                file = FileObject.model_validate(record["file"])
                if purpose is not None and file.purpose != purpose:
                    continue
                if len(files) == limit:
                    return files, True
                files.append(file)
        return files, False
