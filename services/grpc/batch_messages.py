"""The Batch API's objects (REST's pydantic `BatchObject` / `FileObject`) as proto messages:
the same fields, null as unset."""

from __future__ import annotations

from services.grpc.gen.phiserve.v1 import batch_pb2
from services.grpc.gen.phiserve.v1 import inference_service_pb2 as pb
from services.inference.protocol.batches import BatchObject, BatchStatus, FileObject

BATCH_STATUSES: dict[BatchStatus, batch_pb2.BatchStatus] = {
    BatchStatus.validating: batch_pb2.BATCH_STATUS_VALIDATING,
    BatchStatus.in_progress: batch_pb2.BATCH_STATUS_IN_PROGRESS,
    BatchStatus.finalizing: batch_pb2.BATCH_STATUS_FINALIZING,
    BatchStatus.completed: batch_pb2.BATCH_STATUS_COMPLETED,
    BatchStatus.failed: batch_pb2.BATCH_STATUS_FAILED,
    BatchStatus.cancelling: batch_pb2.BATCH_STATUS_CANCELLING,
    BatchStatus.cancelled: batch_pb2.BATCH_STATUS_CANCELLED,
    BatchStatus.expired: batch_pb2.BATCH_STATUS_EXPIRED,
}
_BATCH_TIMES = (
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def batch_message(batch: BatchObject) -> batch_pb2.Batch:
    """REST's Batch object as proto: the same fields, null as unset."""
    message = batch_pb2.Batch(
        id=batch.id,
        endpoint=batch.endpoint,
        input_file_id=batch.input_file_id,
        completion_window=batch.completion_window,
        status=BATCH_STATUSES.get(batch.status, batch_pb2.BATCH_STATUS_UNSPECIFIED),
        created_at=batch.created_at,
        request_counts=batch_pb2.BatchRequestCounts(
            total=batch.request_counts.total,
            completed=batch.request_counts.completed,
            failed=batch.request_counts.failed,
        ),
        metadata=batch.metadata or {},
    )
    if batch.output_file_id:
        message.output_file_id = batch.output_file_id
    if batch.error_file_id:
        message.error_file_id = batch.error_file_id
    for name in _BATCH_TIMES:
        value = getattr(batch, name)
        if value is not None:
            setattr(message, name, value)
    for entry in batch.errors.data if batch.errors else ():
        error = batch_pb2.BatchError(
            code=str(entry.get("code") or ""),
            message=str(entry.get("message") or ""),
            param=str(entry.get("param") or ""),
        )
        if isinstance(entry.get("line"), int):
            error.line = entry["line"]
        message.errors.append(error)
    return message


def file_message(file: FileObject) -> batch_pb2.File:
    return batch_pb2.File(
        id=file.id,
        bytes=file.bytes,
        created_at=file.created_at,
        filename=file.filename,
        purpose=file.purpose,
        status=file.status,
    )


def list_batches_response(batches: list[BatchObject], has_more: bool) -> pb.ListBatchesResponse:
    return pb.ListBatchesResponse(
        batches=[batch_message(batch) for batch in batches],
        first_id=batches[0].id if batches else "",
        last_id=batches[-1].id if batches else "",
        has_more=has_more,
    )


def list_files_response(files: list[FileObject], has_more: bool) -> pb.ListFilesResponse:
    return pb.ListFilesResponse(
        files=[file_message(file) for file in files],
        first_id=files[0].id if files else "",
        last_id=files[-1].id if files else "",
        has_more=has_more,
    )
