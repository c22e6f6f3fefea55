"""The chart's values.schema.json: a valid, strict, fully described schema that follows
phiserve's own settings and catalog models."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel

from services.catalog.models import (
    AutoscalingConfig,
    DeploymentConfig,
    EngineConfig,
    PoolConfig,
)
from services.settings import Settings
from tests.deploy.tooling import CHART, run, tool


def test_values_schema_is_a_valid_json_schema() -> None:
    run([tool("check-jsonschema"), "--check-metaschema", str(CHART / "values.schema.json")])


def test_values_schema_has_a_description_on_every_property() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    missing: list[str] = []

    def walk(node: Any, path: str) -> None:
        if not isinstance(node, dict):
            return
        for name, sub in node.get("properties", {}).items():
            if not isinstance(sub, dict) or not str(sub.get("description", "")).strip():
                missing.append(f"{path}.{name}")
            walk(sub, f"{path}.{name}")
        for key in ("additionalProperties", "items"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{path}.{key}")
        for key in ("oneOf", "anyOf", "allOf"):
            for index, sub in enumerate(node.get(key, [])):
                walk(sub, f"{path}.{key}[{index}]")

    walk(schema, "$")
    assert schema.get("description")
    assert not missing, f"values.schema.json properties without a description: {missing}"


def test_values_schema_is_strict_where_it_names_properties() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    loose: list[str] = []
    # Objects that pass through free-form Kubernetes or phiserve structures on purpose.
    free_form = {
        "podSecurityContext",
        "containerSecurityContext",
        "ray_actor_options",
        "tenants.items",
    }

    def walk(node: Any, path: str) -> None:
        if not isinstance(node, dict):
            return
        strict = node.get("additionalProperties", True) is False
        if node.get("properties") and not strict and not any(path.endswith(n) for n in free_form):
            loose.append(path)
        for name, sub in node.get("properties", {}).items():
            walk(sub, f"{path}.{name}")
        for key in ("additionalProperties", "items"):
            if isinstance(node.get(key), dict):
                walk(node[key], f"{path}.{key}")

    walk(schema, "$")
    assert not loose, f"objects with named properties but additionalProperties not false: {loose}"


def test_values_schema_follows_phiserve_models() -> None:
    """The chart passes settings and catalog entries to phiserve unchanged: its schema must
    know the same fields (add a field there, with its description, when services/ adds one)."""
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]
    settings = set(schema["settings"]["properties"])
    unknown = settings - set(Settings.model_fields)
    assert not unknown, f"values.schema.json settings not in services/settings.py: {unknown}"
    catalog = schema["pools"]["additionalProperties"]["properties"]["catalog"]["properties"]
    deployment = catalog["deployment"]["properties"]
    pairs: dict[str, tuple[set[str], type[BaseModel]]] = {
        "pools.*.catalog": (set(catalog) | {"name", "enabled"}, PoolConfig),
        "pools.*.catalog.engine": (set(catalog["engine"]["properties"]), EngineConfig),
        "pools.*.catalog.deployment": (set(deployment), DeploymentConfig),
        "pools.*.catalog.deployment.autoscaling": (
            set(deployment["autoscaling"]["properties"]),
            AutoscalingConfig,
        ),
    }
    for where, (in_schema, model) in pairs.items():
        fields = set(model.model_fields)
        assert in_schema == fields, (
            f"values.schema.json {where} differs from {model.__name__}: "
            f"add {sorted(fields - in_schema)}, remove {sorted(in_schema - fields)}"
        )
