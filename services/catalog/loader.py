"""Load a catalog profile from YAML and turn validation failures into one readable error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from services.catalog.models import Catalog

PROFILES_DIR = Path(__file__).parent / "profiles"


class CatalogError(ValueError):
    """The catalog cannot be used; the message names each bad field and how to fix it."""


def profile_path(profile: str) -> Path:
    """A profile is a name under `profiles/` (local, h100, ...) or a path to a YAML file."""
    candidate = PROFILES_DIR / f"{profile}.yaml"
    if candidate.is_file():
        return candidate
    path = Path(profile)
    if path.is_file():
        return path
    known = ", ".join(sorted(p.stem for p in PROFILES_DIR.glob("*.yaml")))
    raise CatalogError(f"catalog profile {profile!r} not found: use one of {known} or a path to a YAML file")


def load_catalog(profile: str) -> Catalog:
    path = profile_path(profile)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise CatalogError(f"{path}: not valid YAML: {exc}") from exc
    return parse_catalog(raw, source=str(path))


def parse_catalog(raw: object, *, source: str = "catalog") -> Catalog:
    try:
        return Catalog.model_validate(raw)
    except ValidationError as exc:
        raise CatalogError(_describe(exc, raw, source)) from exc


def _describe(exc: ValidationError, raw: object, source: str) -> str:
    lines = [f"{source}: invalid model catalog ({exc.error_count()} problem(s))"]
    for err in exc.errors():
        lines.append(f"  - {_field_path(err['loc'], raw)}: {_fix_hint(err)}")
    return "\n".join(lines)


def _field_path(loc: tuple[int | str, ...], raw: object) -> str:
    """Render `('pools', 1, 'engine', 'max_model_len')` as `pools[moe].engine.max_model_len`."""
    parts: list[str] = []
    node = raw
    for item in loc:
        if isinstance(item, int):
            name = (
                node[item].get("name")
                if isinstance(node, list) and item < len(node) and isinstance(node[item], dict)
                else None
            )
            parts[-1] += f"[{name or item}]"
            node = node[item] if isinstance(node, list) and item < len(node) else None
        else:
            parts.append(item)
            node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts) or "<root>"


def _fix_hint(err: Any) -> str:
    kind = err["type"]
    if kind == "extra_forbidden":
        return "unknown field; remove it or check its spelling"
    if kind == "missing":
        return "required field is missing; add it"
    message = str(err["msg"]).removeprefix("Value error, ")
    if "input" in err and kind not in ("model_type",):
        return f"{message} (got {err['input']!r})"
    return message
