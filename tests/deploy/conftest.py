"""Fixtures of the deploy tests: the real tools and the chart rendered per values file."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.deploy.tooling import CHART, NAMESPACE, RELEASE, VALUES_FILES, run, tool

# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def helm() -> str:
    return tool("helm")


@pytest.fixture(scope="session")
def promtool() -> str:
    return tool("promtool")


@pytest.fixture(scope="session")
def rendered(helm: str) -> dict[str, list[dict[str, Any]]]:
    """`helm template` of each values set, as parsed documents."""
    out = {}
    for name, files in VALUES_FILES.items():
        cmd = [helm, "template", RELEASE, str(CHART), "--namespace", NAMESPACE]
        for values in files:
            cmd += ["-f", str(CHART / values)]
        text = run(cmd)
        out[name] = [doc for doc in yaml.safe_load_all(text) if doc]
    return out


@pytest.fixture(params=list(VALUES_FILES))
def values_name(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def docs(rendered: dict[str, list[dict[str, Any]]], values_name: str) -> list[dict[str, Any]]:
    return rendered[values_name]
