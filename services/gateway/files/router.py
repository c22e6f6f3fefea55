"""HTTP only: the Files API (batch input and output files), scoped to the caller's tenant."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import Response

from services.gateway.deps import Files, LimitedTenant
from services.gateway.errors import ERROR_RESPONSES
from services.inference.protocol.batches import (
    MAX_FILE_LIST_LIMIT,
    FileList,
    FileListOrder,
    FileObject,
    FilePurpose,
)
from services.inference.protocol.responses import FileDeleted

router = APIRouter(prefix="/v1/files", responses=ERROR_RESPONSES)


@router.post("", status_code=200)
async def upload_file(
    tenant: LimitedTenant,
    files: Files,
    file: Annotated[UploadFile, File(description="JSONL: one request per line")],
    purpose: Annotated[Literal["batch"], Form(description="Only batch input files are uploaded.")],
) -> FileObject:
    data = await file.read()
    return await files.upload(tenant.id, filename=file.filename or "", purpose=purpose, data=data)


@router.get("")
async def list_files(
    tenant: LimitedTenant,
    files: Files,
    purpose: Annotated[FilePurpose | None, Query(description="Only files of this purpose.")] = None,
    order: Annotated[FileListOrder, Query(description="By creation time.")] = "desc",
    after: Annotated[str | None, Query(description="A file id of the previous page's last_id.")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_FILE_LIST_LIMIT)] = MAX_FILE_LIST_LIMIT,
) -> FileList:
    page, has_more = await files.list(tenant.id, purpose=purpose, order=order, after=after, limit=limit)
    return FileList(
        data=page,
        first_id=page[0].id if page else None,
        last_id=page[-1].id if page else None,
        has_more=has_more,
    )


@router.get("/{file_id}")
async def get_file(file_id: str, tenant: LimitedTenant, files: Files) -> FileObject:
    return await files.get(tenant.id, file_id)


@router.get(
    "/{file_id}/content",
    response_class=Response,
    responses={
        200: {
            "description": "The file's bytes: an uploaded input, or a batch's output or error lines",
            "content": {"application/jsonl": {"schema": {"type": "string"}}},
        }
    },
)
async def get_file_content(file_id: str, tenant: LimitedTenant, files: Files) -> Response:
    return Response(await files.content(tenant.id, file_id), media_type="application/jsonl")


@router.delete("/{file_id}")
async def delete_file(file_id: str, tenant: LimitedTenant, files: Files) -> FileDeleted:
    file = await files.delete(tenant.id, file_id)
    return {"id": file.id, "object": "file", "deleted": True}
