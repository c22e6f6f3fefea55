"""The Files and Batches APIs, built on a replica's core (the HTTP and gRPC adapters and the
batch worker call them through `services.inference.ports`)."""

from __future__ import annotations

from services.batch.files import FileService, LocalFileStore
from services.batch.service import BatchService
from services.inference.core import Core
from services.settings import Settings


def build_batch_api(core: Core, settings: Settings) -> tuple[FileService, BatchService]:
    files = FileService(
        core.redis,
        LocalFileStore(settings.batch_files_dir),
        max_bytes=settings.max_batch_file_bytes,
        max_lines=settings.max_batch_lines,
        max_files=settings.tenant_max_files,
        max_stored_bytes=settings.tenant_max_file_bytes,
    )
    batches = BatchService(
        core.redis,
        files,
        core.resolver,
        max_active=settings.tenant_max_active_batches,
        max_queued_items=settings.tenant_max_queued_items,
        enqueue_chunk=settings.batch_enqueue_chunk,
        retention_s=settings.batch_retention_s,
    )
    return files, batches
