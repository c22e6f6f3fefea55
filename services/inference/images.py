"""Image URLs in chat messages -> raw bytes for the vision pool.

Base64 `data:` URLs always; http(s) URLs only when settings allow it. Fetching a URL a
client chose, from inside the cluster, is a server-side request forgery risk, so a remote
fetch (issue 9, item 9):

* resolves the name first and refuses it unless every address is public (no private,
  loopback, link-local, cloud-metadata, carrier-grade NAT or reserved address), then
  connects to exactly the addresses it checked (no second lookup to rebind);
* follows no redirect (a 3xx could point anywhere);
* reads the body to the limit and refuses a larger one (never a truncated image);
* answers every failure with one error, so the gateway is no oracle for what lies behind
  a URL (open port, status code, size); the reason goes to the log only.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import ipaddress
import logging
import socket
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult

from services.errors import InvalidRequest

logger = logging.getLogger(__name__)

DATA_URL_PREFIX = "data:"
# Decoding base64 costs ~1 ms per 100 KB: larger payloads are decoded off the event loop.
DECODE_OFF_LOOP_BYTES = 256 * 1024
READ_CHUNK_BYTES = 64 * 1024
FETCH_FAILED = "the image URL could not be fetched; send the image as a base64 data: URL instead"


class _FetchRefused(Exception):
    """Any reason a remote fetch fails; logged, never shown to the client."""


class ImageLoader:
    def __init__(
        self, *, allow_remote: bool, max_bytes: int, timeout_s: float, allow_loopback: bool = False
    ) -> None:
        """`allow_loopback` is for tests only (a local HTTP server); settings never set it."""
        self._allow_remote = allow_remote
        self._max_bytes = max_bytes
        self._timeout_s = timeout_s
        self._allow_loopback = allow_loopback

    async def load(self, url: str, *, param: str) -> bytes:
        if url.startswith(DATA_URL_PREFIX):
            if len(url) > DECODE_OFF_LOOP_BYTES:
                return await asyncio.to_thread(_decode_data_url, url, param=param)
            return _decode_data_url(url, param=param)
        if url.startswith(("http://", "https://")):
            if not self._allow_remote:
                raise InvalidRequest(
                    "remote image URLs are disabled on this server; send the image as a "
                    "base64 data: URL (data:image/png;base64,...)",
                    param=param,
                    code="remote_image_url_disabled",
                )
            try:
                async with asyncio.timeout(self._timeout_s):
                    return await self._fetch(url)
            except (_FetchRefused, aiohttp.ClientError, OSError, TimeoutError, ValueError) as exc:
                logger.info("remote image refused (%s: %s)", type(exc).__name__, exc)
                raise InvalidRequest(FETCH_FAILED, param=param, code="image_fetch_failed") from None
        raise InvalidRequest("image_url.url must be a data: URL or an http(s) URL", param=param)

    async def _fetch(self, url: str) -> bytes:
        parts = urlsplit(url)
        host = parts.hostname
        if not host:
            raise _FetchRefused("no host")
        port = parts.port or (443 if parts.scheme == "https" else 80)
        addresses = await self._checked_addresses(host, port)
        connector = aiohttp.TCPConnector(resolver=_PinnedResolver(host, addresses), use_dns_cache=False)
        async with (
            aiohttp.ClientSession(connector=connector, trust_env=False) as session,
            session.get(url, allow_redirects=False) as resp,
        ):
            if resp.status != 200:
                raise _FetchRefused(f"HTTP {resp.status}")
            if resp.content_length is not None and resp.content_length > self._max_bytes:
                raise _FetchRefused(f"declared {resp.content_length} bytes")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(READ_CHUNK_BYTES):
                body += chunk
                if len(body) > self._max_bytes:
                    raise _FetchRefused(f"body over {self._max_bytes} bytes")
            return bytes(body)

    async def _checked_addresses(self, host: str, port: int) -> list[ResolveResult]:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        results: list[ResolveResult] = []
        for family, _, proto, _, sockaddr in infos:
            address = str(sockaddr[0])
            if not self._is_allowed(address):
                # One refused address refuses the name: no mixing of public and private answers.
                raise _FetchRefused(f"{host} resolves to a refused address")
            results.append(
                ResolveResult(
                    hostname=host,
                    host=address,
                    port=port,
                    family=family,
                    proto=proto,
                    flags=socket.AI_NUMERICHOST,
                )
            )
        if not results:
            raise _FetchRefused(f"{host} has no address")
        return results

    def _is_allowed(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)  # a scoped IPv6 (fe80::1%eth0) fails here
        except ValueError:
            return False
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        if self._allow_loopback and ip.is_loopback:
            return True
        # is_global excludes private, loopback, link-local (169.254.169.254 metadata),
        # unique-local (fd00:ec2::254), shared 100.64/10, reserved and unspecified ranges.
        return ip.is_global and not ip.is_multicast


class _PinnedResolver(AbstractResolver):
    """Answers the checked addresses for the one host, so aiohttp connects to them."""

    def __init__(self, host: str, addresses: list[ResolveResult]) -> None:
        self._host = host
        self._addresses = addresses

    async def resolve(self, host: str, port: int = 0, family: Any = socket.AF_INET) -> list[ResolveResult]:
        if host != self._host:
            raise _FetchRefused(f"unexpected host {host}")
        return self._addresses

    async def close(self) -> None:
        return None


def _decode_data_url(url: str, *, param: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or ";base64" not in header or not header[len(DATA_URL_PREFIX) :].startswith("image/"):
        raise InvalidRequest("image data URLs must look like data:image/<type>;base64,<data>", param=param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("the image data URL is not valid base64", param=param) from None
