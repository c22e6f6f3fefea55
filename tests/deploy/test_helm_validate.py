"""The Helm chart checked with the real tools: `helm lint --strict`, kubernetes-validate for
built-in kinds and the strict CRD schemas for custom resources."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.tooling import (
    CHART,
    KUBERNETES_VERSION,
    VALUES_FILES,
    doc_id,
    is_builtin,
    run,
    schema_for,
    tool,
)

# ----------------------------------------------------------------- Helm: tools and schemas


def test_helm_lint_strict(helm: str, values_name: str) -> None:
    cmd = [helm, "lint", "--strict", str(CHART)]
    for values in VALUES_FILES[values_name]:
        cmd += ["-f", str(CHART / values)]
    output = run(cmd)
    assert "1 chart(s) linted, 0 chart(s) failed" in output


def test_builtin_kinds_pass_kubernetes_validate(docs: list[dict[str, Any]], tmp_path: Path) -> None:
    builtin = [doc for doc in docs if is_builtin(doc)]
    assert builtin
    path = tmp_path / "builtin.yaml"
    path.write_text(yaml.safe_dump_all(builtin))
    output = run([tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, str(path)])
    # kubernetes-validate only warns (exit 0) for a kind it does not know: demand a pass each.
    passed = re.findall(r"passed for resource (\S+)", output)
    assert len(passed) == len(builtin), output
    assert "WARN" not in output and "ERROR" not in output, output


def test_custom_resources_pass_their_strict_schemas(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    """All renders at once: one check-jsonschema run per schema (loading the RayService
    schema, 770 KB, is most of the cost)."""
    by_schema: dict[Path, list[Path]] = {}
    missing = []
    for values_name, docs in rendered.items():
        custom = [doc for doc in docs if not is_builtin(doc)]
        assert {doc["kind"] for doc in custom} >= {"RayService", "PrometheusRule"}, values_name
        for index, doc in enumerate(custom):
            schema = schema_for(doc)
            if not schema.is_file():
                missing.append(f"{values_name}: {doc_id(doc)} -> {schema}")
                continue
            path = tmp_path / f"{values_name}-{index}-{doc['kind'].lower()}-{doc['metadata']['name']}.json"
            path.write_text(json.dumps(doc))
            by_schema.setdefault(schema, []).append(path)
    assert not missing, f"no schema for these custom resources (never skipped): {missing}"
    for schema, instances in by_schema.items():
        run([tool("check-jsonschema"), "--schemafile", str(schema), *map(str, instances)])


def test_crd_schemas_are_vendored_in_the_repository() -> None:
    """A fresh clone stands alone (issue 9, item 10): the schemas the check above uses live in
    deploy/helm/schemas/, each named in its SOURCES.md with upstream repository and version."""
    from tests.deploy.tooling import REPO, SCHEMAS

    assert SCHEMAS.resolve().is_relative_to(REPO), f"{SCHEMAS} is outside the repository"
    sources = (SCHEMAS / "SOURCES.md").read_text()
    vendored = sorted(p.relative_to(SCHEMAS).as_posix() for p in SCHEMAS.glob("*/*.json"))
    assert {"ray.io/rayservice_v1.json", "monitoring.coreos.com/prometheusrule_v1.json"} <= set(vendored)
    for name in vendored:
        row = next((line for line in sources.splitlines() if line.startswith(f"| {name} |")), None)
        assert row is not None and re.search(r"\| v\d+\.\d+\.\d+ \| [0-9a-f]{40} \|", row), name
        assert json.loads((SCHEMAS / name).read_text())["type"] == "object", name
    assert "shared" not in (Path(__file__).parent / "tooling.py").read_text()  # no path beside the repo
