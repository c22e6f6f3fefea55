"""HTTP only: POST /tokenize and /detokenize (vLLM's routes), also under /v1/."""

from __future__ import annotations

from fastapi import APIRouter

from services.gateway.deps import CoreServices, LimitedTenant
from services.gateway.errors import ERROR_RESPONSES
from services.inference.protocol.tokenize import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)

router = APIRouter(responses=ERROR_RESPONSES)


# A tenant's call like a generation's (its key, its models), counted against its RPM.
@router.post("/tokenize")
@router.post("/v1/tokenize")
async def tokenize(body: TokenizeRequest, tenant: LimitedTenant, core: CoreServices) -> TokenizeResponse:
    """The token ids of a prompt, or of messages rendered with the model's chat template:
    the count a generation's `usage.prompt_tokens` reports."""
    return await core.tokenize.tokenize(tenant, body)


@router.post("/detokenize")
@router.post("/v1/detokenize")
async def detokenize(
    body: DetokenizeRequest, tenant: LimitedTenant, core: CoreServices
) -> DetokenizeResponse:
    """The text of token ids of the model's vocabulary."""
    return await core.tokenize.detokenize(tenant, body)
