"""Shared test helpers: images, pool handles, event-loop stalls."""

from __future__ import annotations

import asyncio
import base64
import io
import time
from typing import Any


def png_data_url(width: int = 320, height: int = 240) -> str:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, height), (30, 90, 200))
    draw = ImageDraw.Draw(image)
    draw.rectangle((width // 4, height // 4, width // 2, height // 2), fill=(250, 200, 0))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def pool_diagnostics(pool_name: str) -> dict:  # type: ignore[type-arg]
    from ray import serve

    from services.app import APP_NAME

    handle = serve.get_deployment_handle(f"pool-{pool_name}", app_name=APP_NAME)
    return handle.diagnostics.remote().result(timeout_s=30)


class LoopStallMeter:
    """Measures the longest gap between ticks of a task on the running event loop, which
    stands in for every other request a replica serves while the measured work runs."""

    TICK_S = 0.005

    def __init__(self) -> None:
        self.longest_gap = 0.0
        self.took = 0.0
        self._done = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._started = 0.0

    async def _tick(self) -> None:
        last = time.perf_counter()
        while not self._done.is_set():
            await asyncio.sleep(self.TICK_S)
            now = time.perf_counter()
            self.longest_gap = max(self.longest_gap, now - last)
            last = now

    async def __aenter__(self) -> LoopStallMeter:
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0.05)
        self._started = time.perf_counter()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.took = time.perf_counter() - self._started
        self._done.set()
        assert self._task is not None
        await self._task
