"""Image URLs in chat messages -> raw bytes for the vision pool.

Base64 `data:` URLs always; http(s) URLs only when settings allow it (fetching
arbitrary URLs from inside the cluster is a server-side request forgery risk).
"""

from __future__ import annotations

import base64
import binascii

import aiohttp

from services.errors import InvalidRequest

DATA_URL_PREFIX = "data:"


class ImageLoader:
    def __init__(self, *, allow_remote: bool, max_bytes: int, timeout_s: float) -> None:
        self._allow_remote = allow_remote
        self._max_bytes = max_bytes
        self._timeout_s = timeout_s

    async def load(self, url: str, *, param: str) -> bytes:
        if url.startswith(DATA_URL_PREFIX):
            return _decode_data_url(url, param=param)
        if url.startswith(("http://", "https://")):
            if not self._allow_remote:
                raise InvalidRequest(
                    "remote image URLs are disabled on this server; send the image as a "
                    "base64 data: URL (data:image/png;base64,...)",
                    param=param,
                    code="remote_image_url_disabled",
                )
            return await self._fetch(url, param=param)
        raise InvalidRequest("image_url.url must be a data: URL or an http(s) URL", param=param)

    async def _fetch(self, url: str, *, param: str) -> bytes:
        timeout = aiohttp.ClientTimeout(total=self._timeout_s)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as resp:
                if resp.status != 200:
                    raise InvalidRequest(f"fetching the image returned HTTP {resp.status}", param=param)
                data = await resp.content.read(self._max_bytes + 1)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise InvalidRequest(f"the image could not be fetched ({type(exc).__name__})", param=param) from None
        if len(data) > self._max_bytes:
            raise InvalidRequest(f"the image is larger than {self._max_bytes} bytes", param=param)
        return data


def _decode_data_url(url: str, *, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header or not header[len(DATA_URL_PREFIX):].startswith("image/"):
        raise InvalidRequest(
            "image data URLs must look like data:image/<type>;base64,<data>", param=param
        )
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("the image data URL is not valid base64", param=param) from None
