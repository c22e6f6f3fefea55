"""phiserve load test: settings from locust's command line, and the tenants' API keys.

`build_config` turns the locustfile's options into a `Config`; `load_keys` reads --keys-file
and `KeyPicker` gives each user its key (round-robin or weighted). The locustfile's init
listener stores the active `Config` (and locust's `Environment`) in CONFIG / ENVIRONMENT.
"""

from __future__ import annotations

import base64
import io
import itertools
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from locust.env import Environment

TTFT = "TTFT"
RATE_LIMITED = "429"
BATCH = "BATCH"
REFUSAL_CODES = frozenset({"rate_limit_exceeded", "overloaded"})
FINAL_BATCH_STATES = frozenset({"completed", "failed", "cancelled", "expired"})
PROMPTS = (
    "Summarise the plot of a detective novel in two sentences.",
    "Explain what a load balancer does.",
    "Write a haiku about autumn rain.",
    "List three uses of a hash map.",
    "What is the capital of Australia, and why was it chosen?",
)
USER_CLASS_KEYS = {"rest": "RestUser", "grpc": "GrpcUser", "vision": "VisionUser", "batch": "BatchUser"}

@dataclass(frozen=True)
class ApiKey:
    key: str
    label: str
    weight: float = 1.0


def _label(key: str, index: int) -> str:
    # phiserve keys are psk-<key id>-<secret>; the first two parts are the non-secret prefix.
    parts = key.split("-")
    return "-".join(parts[:2]) if key.startswith("psk-") and len(parts) > 2 else f"key{index + 1}"


def load_keys(path: str) -> list[ApiKey]:
    """Keys from a file: one per line, or JSON (list, {"keys": [...]}, or {key: weight})."""
    text = Path(path).read_text(encoding="utf-8")
    if text.lstrip().startswith(("[", "{")):
        data: Any = json.loads(text)
        if isinstance(data, dict) and "keys" in data:
            data = data["keys"]
        items = [{"key": k, "weight": w} for k, w in data.items()] if isinstance(data, dict) else list(data)
        keys = []
        for i, item in enumerate(items):
            item = {"key": item} if isinstance(item, str) else item
            label = str(item.get("name") or item.get("tenant") or _label(item["key"], i))
            keys.append(ApiKey(str(item["key"]), label, float(item.get("weight", 1.0))))
    else:
        lines = [line.strip() for line in text.splitlines()]
        keys = [
            ApiKey(k, _label(k, i)) for i, k in enumerate(k for k in lines if k and not k.startswith("#"))
        ]
    if not keys:
        raise ValueError(f"no API keys in {path}")
    if any(k.weight < 0 for k in keys) or not any(k.weight > 0 for k in keys):
        raise ValueError(f"key weights in {path} must be >= 0 and not all 0")
    return keys


class KeyPicker:
    def __init__(self, keys: list[ApiKey], mode: str) -> None:
        self.keys = keys
        self.weighted = mode == "weighted" or (mode == "auto" and len({k.weight for k in keys}) > 1)
        self._next = itertools.count()

    def pick(self) -> ApiKey:
        if self.weighted:
            return random.choices(self.keys, weights=[k.weight for k in self.keys])[0]
        return self.keys[next(self._next) % len(self.keys)]


@dataclass(frozen=True)
class Config:
    keys: KeyPicker
    stats_by_key: bool
    chat_models: list[str]
    grpc_models: list[str]
    vision_models: list[str]
    batch_models: list[str]
    stream_ratio: float
    max_tokens: int
    ignore_eos: bool
    image_url: str
    grpc_target: str
    batch_lines: int
    batch_poll_interval: float
    batch_timeout: float
    request_timeout: float
    think_time: tuple[float, float]


def _models(value: str, default: str) -> list[str]:
    return [m.strip() for m in (value or default).split(",") if m.strip()]


def png(width: int, height: int) -> bytes:
    from PIL import Image, ImageDraw

    picture = Image.new("RGB", (width, height), (30, 90, 200))
    draw = ImageDraw.Draw(picture)
    draw.rectangle((width // 4, height // 4, width // 2, height // 2), fill=(250, 200, 0))
    draw.ellipse((width // 2, height // 2, width - 4, height - 4), fill=(20, 160, 60))
    buf = io.BytesIO()
    picture.save(buf, format="PNG")
    return buf.getvalue()


def build_config(environment: Environment) -> Config:
    options = environment.parsed_options
    if options.keys_file:
        keys = load_keys(options.keys_file)
    elif os.environ.get("PHISERVE_API_KEY"):
        keys = [ApiKey(os.environ["PHISERVE_API_KEY"], "PHISERVE_API_KEY")]
    else:
        raise SystemExit("phiserve locustfile: give --keys-file or set PHISERVE_API_KEY")
    grpc_target = options.grpc_target
    if not grpc_target:
        host = urlsplit(environment.host or "http://127.0.0.1:8000").hostname or "127.0.0.1"
        grpc_target = f"{host}:{options.grpc_port}"
    width, _, height = options.image_size.lower().partition("x")
    picture = png(int(width), int(height or width))
    think = [float(x) for x in str(options.think_time).split(",")]
    chat_models = _models(options.chat_model, "phi-3.5-mini")
    return Config(
        keys=KeyPicker(keys, options.key_selection),
        stats_by_key=options.stats_by_key,
        chat_models=chat_models,
        grpc_models=_models(options.grpc_model, ",".join(chat_models)),
        vision_models=_models(options.vision_model, "phi-3.5-vision"),
        batch_models=_models(options.batch_model, ",".join(chat_models)),
        stream_ratio=min(max(options.stream_ratio, 0.0), 1.0),
        max_tokens=options.max_tokens,
        ignore_eos=options.ignore_eos == "true",
        image_url="data:image/png;base64," + base64.b64encode(picture).decode(),
        grpc_target=grpc_target,
        batch_lines=options.batch_lines,
        batch_poll_interval=options.batch_poll_interval,
        batch_timeout=options.batch_timeout,
        request_timeout=options.request_timeout,
        think_time=(think[0], think[-1]),
    )

CONFIG: Config | None = None
ENVIRONMENT: Environment | None = None
