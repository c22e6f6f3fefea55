"""The layout of issue 10, held as a test: the core imports no adapter, the adapters (HTTP,
gRPC, batch) import the core and never each other, and the serving code never loads the
local tooling (tiny-model builder, private redis-server, local Ray cluster)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SERVICES = Path(__file__).resolve().parents[1] / "services"
ADAPTERS = ("gateway", "grpc", "batch")
# Nothing the core and the layers under it may import.
ABOVE_THE_CORE = (*ADAPTERS, "ingress", "app", "cli", "status", "local")
UNDER_THE_CORE = ("tenancy", "redis_store", "pools", "catalog", "errors", "settings")


def _imports(package: str) -> dict[str, set[str]]:
    """file -> the `services.<top>` packages its imports name (at any depth in the file)."""
    found: dict[str, set[str]] = {}
    root = SERVICES / package
    files = [root.with_suffix(".py")] if root.with_suffix(".py").exists() else sorted(root.rglob("*.py"))
    for path in files:
        if "gen" in path.relative_to(SERVICES).parts:
            continue
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            modules = (
                [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else []
            )
            for module in modules:
                parts = module.split(".")
                if parts[0] == "services" and len(parts) > 1:
                    names.add(parts[1])
        found[str(path.relative_to(SERVICES))] = names
    return found


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_an_adapter_imports_no_other_adapter(adapter: str) -> None:
    others = set(ADAPTERS) - {adapter}
    for path, names in _imports(adapter).items():
        assert not names & others, f"{path} imports {sorted(names & others)}"
        assert not names & {"ingress", "app", "cli", "local"}, f"{path} imports {sorted(names)}"


@pytest.mark.parametrize("package", ("inference", *UNDER_THE_CORE))
def test_the_core_and_what_it_stands_on_import_nothing_above(package: str) -> None:
    forbidden = set(ABOVE_THE_CORE)
    if package != "inference":
        forbidden.add("inference")
    for path, names in _imports(package).items():
        assert not names & forbidden, f"{path} imports {sorted(names & forbidden)}"


def test_the_serving_code_never_loads_the_local_tooling() -> None:
    probe = (
        "import sys, services.app, services.ingress, services.batch.deployment, services.pools.deployment;"
        "print(sorted(m for m in sys.modules if m.startswith('services.local')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout
