"""Shared test helpers: images, pool handles."""

from __future__ import annotations

import base64
import io


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
