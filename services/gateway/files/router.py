"""HTTP only: the Files API (batch input and output files), scoped to the caller's tenant."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import Response

from services.gateway.deps import Files, LimitedTenant
from services.gateway.errors import ERROR_RESPONSES
from services.inference.protocol.batches import FileList, FileObject
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
async def list_files(tenant: LimitedTenant, files: Files, limit: int = 100) -> FileList:
    return FileList(data=await files.list(tenant.id, limit=max(1, min(limit, 1000))))


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
