"""Remote image fetching when enabled (issue 9, item 9): the real ImageLoader against a real
local aiohttp server. No redirects, no private/loopback/link-local/metadata addresses (the
name is resolved first and the checked address is the one connected to), one uniform error
for every failure, and a body over the limit is refused, never truncated.

Loopback is reachable only through the loader's explicit test-only `allow_loopback=True`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from aiohttp import web

from services.errors import InvalidRequest
from services.inference.images import ImageLoader

LIMIT = 64 * 1024
PNG_ISH = b"\x89PNG\r\n\x1a\n" + b"x" * 1000


@dataclass
class Origin:
    url: str
    hits: list[str] = field(default_factory=list)


@pytest.fixture
async def origin() -> AsyncIterator[Origin]:
    hits: list[str] = []

    async def image(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(body=PNG_ISH, content_type="image/png")

    async def redirect(request: web.Request) -> web.Response:
        hits.append(request.path)
        raise web.HTTPFound("/image")

    async def missing(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.Response(status=404, text="no such image")

    async def chunked(request: web.Request) -> web.StreamResponse:
        # Sent in pieces with a pause between them, so one read() returns only the first.
        hits.append(request.path)
        total = int(request.query["bytes"])
        resp = web.StreamResponse(headers={"Content-Type": "image/png"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        sent = 0
        while sent < total:
            piece = min(8192, total - sent)
            await resp.write(b"y" * piece)
            sent += piece
            await asyncio.sleep(0.005)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/image", image)
    app.router.add_get("/redirect", redirect)
    app.router.add_get("/missing", missing)
    app.router.add_get("/chunked", chunked)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield Origin(url=f"http://127.0.0.1:{port}", hits=hits)
    finally:
        await runner.cleanup()


def _loader(**options: object) -> ImageLoader:
    return ImageLoader(allow_remote=True, max_bytes=LIMIT, timeout_s=2.0, **options)  # type: ignore[arg-type]


async def _refusal(loader: ImageLoader, url: str) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        await loader.load(url, param="messages[0].content[0].image_url.url")
    return info.value


async def test_fetches_an_allowed_origin_in_full(origin: Origin) -> None:
    loader = _loader(allow_loopback=True)
    assert await loader.load(f"{origin.url}/image", param="p") == PNG_ISH
    # A body under the limit that arrives in many pieces is read whole, not cut at one read.
    body = await loader.load(f"{origin.url}/chunked?bytes={LIMIT - 10}", param="p")
    assert body == b"y" * (LIMIT - 10)


async def test_a_body_over_the_limit_is_refused_not_truncated(origin: Origin) -> None:
    err = await _refusal(_loader(allow_loopback=True), f"{origin.url}/chunked?bytes={2 * LIMIT}")
    assert err.code == "image_fetch_failed"


async def test_redirects_are_not_followed(origin: Origin) -> None:
    err = await _refusal(_loader(allow_loopback=True), f"{origin.url}/redirect")
    assert err.code == "image_fetch_failed"
    assert origin.hits == ["/redirect"]  # the target was never requested


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1",
        "localhost",  # resolved first: a name is checked by the address it points to
        "[::1]",
        "169.254.169.254",  # cloud metadata
        "[fd00:ec2::254]",  # AWS metadata over IPv6
        "10.1.2.3",
        "192.168.0.10",
        "172.16.5.4",
        "100.64.0.1",  # carrier-grade NAT
        "0.0.0.0",
        "[::ffff:127.0.0.1]",  # IPv4-mapped loopback
    ],
)
async def test_private_loopback_link_local_and_metadata_addresses_are_refused(
    origin: Origin, host: str
) -> None:
    port = origin.url.rsplit(":", 1)[1]
    err = await _refusal(_loader(), f"http://{host}:{port}/image")
    assert err.code == "image_fetch_failed"
    assert origin.hits == []


async def test_every_failure_gives_the_same_answer(origin: Origin) -> None:
    """No oracle: refused address, 404, redirect, oversize and a closed port look alike."""
    open_loader = _loader(allow_loopback=True)
    port = origin.url.rsplit(":", 1)[1]
    errors = [
        await _refusal(_loader(), f"{origin.url}/image"),
        await _refusal(open_loader, f"{origin.url}/missing"),
        await _refusal(open_loader, f"{origin.url}/redirect"),
        await _refusal(open_loader, f"{origin.url}/chunked?bytes={2 * LIMIT}"),
        await _refusal(open_loader, "http://127.0.0.1:1/image"),  # nothing listens there
        await _refusal(open_loader, "http://no-such-host.invalid/image"),
    ]
    assert {(e.message, e.code, e.param) for e in errors} == {
        (errors[0].message, "image_fetch_failed", "messages[0].content[0].image_url.url")
    }
    assert port not in errors[0].message


async def test_remote_urls_stay_off_unless_enabled(origin: Origin) -> None:
    loader = ImageLoader(allow_remote=False, max_bytes=LIMIT, timeout_s=2.0)
    err = await _refusal(loader, f"{origin.url}/image")
    assert err.code == "remote_image_url_disabled"
    assert origin.hits == []
