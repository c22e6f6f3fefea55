"""What the core asks of the parts built outside it: the pool handles Serve injects, and the
Files and Batches APIs (implemented in services/batch/, called by the HTTP and gRPC adapters).

Protocols, so an adapter depends on the shape of a service, not on the package that builds it,
and a test can pass a fake.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from services.inference.protocol.batches import (
    MAX_FILE_LIST_LIMIT,
    BatchObject,
    CreateBatchRequest,
    FileListOrder,
    FileObject,
)


class PoolHandle(Protocol):
    """A Ray Serve deployment handle of one model pool (the subset the router calls)."""

    @property
    def app_name(self) -> str: ...

    @property
    def deployment_name(self) -> str: ...

    def options(self, **kwargs: Any) -> PoolHandle: ...

    def __getattr__(self, method: str) -> Any: ...


class FileApi(Protocol):
    async def upload(self, tenant_id: str, *, filename: str, purpose: str, data: bytes) -> FileObject: ...

    async def get(self, tenant_id: str, file_id: str) -> FileObject: ...

    async def content(self, tenant_id: str, file_id: str) -> bytes: ...

    async def delete(self, tenant_id: str, file_id: str) -> FileObject: ...

    async def list(
        self,
        tenant_id: str,
        *,
        purpose: str | None = None,
        order: FileListOrder = "desc",
        after: str | None = None,
        limit: int = MAX_FILE_LIST_LIMIT,
    ) -> tuple[list[FileObject], bool]:
        """A page of the tenant's files and whether more follow; a bad filter is a 400 naming
        it (`after` must be one of the tenant's files)."""
        ...


class BatchApi(Protocol):
    async def create(self, tenant_id: str, req: CreateBatchRequest) -> BatchObject: ...

    async def get(self, tenant_id: str, batch_id: str) -> BatchObject: ...

    async def list(
        self, tenant_id: str, *, after: str | None, limit: int
    ) -> tuple[list[BatchObject], bool]: ...

    async def cancel(self, tenant_id: str, batch_id: str) -> BatchObject: ...


@dataclass(frozen=True)
class BatchApis:
    """The Files and Batches APIs a replica serves, as the adapters receive them."""

    files: FileApi
    batches: BatchApi
