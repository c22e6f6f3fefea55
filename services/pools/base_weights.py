"""A base model's linear modules, from its safetensors headers alone (issue 14).

Adapter validation (services/pools/adapter_files.py) needs the (out, in) shape of every
linear weight an adapter may target. The headers hold them: reading a header costs a few
kilobytes whatever the model's size, and no weight is loaded. A sharded checkpoint is read
through its `model.safetensors.index.json`.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit
# A decoder layer's module (`model.layers.3.self_attn.qkv_proj`; also under a prefix such as
# `language_model.`); a vision tower's `encoder.layers.N` is not one.
DECODER_LAYER = re.compile(r"(?:^|\.)model\.layers\.(\d+)\.")


@dataclass(frozen=True, slots=True)
class BaseModules:
    """The base model's linear layers: module path -> (out, in) of its 2-D weight."""

    shapes: Mapping[str, tuple[int, int]]

    @property
    def names(self) -> frozenset[str]:
        return frozenset(path.rsplit(".", 1)[-1] for path in self.shapes)


def read_header(file: Path) -> tuple[dict[str, dict[str, Any]], int]:
    """A safetensors file's tensor entries and where its data starts (the format: a
    little-endian u64 header length, the JSON header, then the data); ValueError when the
    file is too short or the header too large to be one."""
    with file.open("rb") as handle:
        raw = handle.read(8)
        if len(raw) != 8:
            raise ValueError(f"{file.name} is too short to be a safetensors file")
        length: int = struct.unpack("<Q", raw)[0]
        if length > MAX_HEADER_BYTES:
            raise ValueError(f"{file.name}'s header is over {MAX_HEADER_BYTES} bytes")
        header = json.loads(handle.read(length))
    if not isinstance(header, dict):
        raise ValueError(f"{file.name}'s header is not a JSON object")  # noqa: TRY004 - bad data
    header.pop("__metadata__", None)
    return header, 8 + length


def base_modules(model_path: str) -> BaseModules | None:
    """The linear modules of the decoder layers of the base model at `model_path`; None when
    its weights are not a local folder (a hub id the pool downloads)."""
    folder = Path(model_path)
    if not folder.is_dir():
        return None
    return _base_modules(str(folder.resolve()))


@lru_cache(maxsize=16)  # a served model's files do not change while it is served
def _base_modules(folder: str) -> BaseModules | None:
    root = Path(folder)
    index = root / "model.safetensors.index.json"
    files: Iterable[Path]
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({root / name for name in weight_map.values()})
    else:
        files = sorted(root.glob("*.safetensors"))
    shapes: dict[str, tuple[int, int]] = {}
    for file in files:
        for name, entry in read_header(file)[0].items():
            if name.endswith(".weight") and len(entry["shape"]) == 2 and DECODER_LAYER.search(name):
                shapes[name[: -len(".weight")]] = (entry["shape"][0], entry["shape"][1])
    return BaseModules(shapes) if shapes else None
