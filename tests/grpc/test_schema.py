"""The schema's checks (buf lint, format, breaking) and the generated code's freshness."""

from __future__ import annotations

import filecmp
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROTO = REPO / "proto"
GEN = REPO / "services" / "grpc" / "gen"
INFERENCE_METHODS = [
    "Chat",
    "ChatStream",
    "Complete",
    "CompleteStream",
    "ListModels",
    "GetModel",
    "DeleteModel",
    "Tokenize",
    "Detokenize",
]
BATCH_METHODS = [
    "UploadFile",
    "GetFile",
    "GetFileContent",
    "ListFiles",
    "DeleteFile",
    "CreateBatch",
    "GetBatch",
    "ListBatches",
    "CancelBatch",
]


def _buf() -> str:
    # buf-bin (pinned in pyproject's test extra) installs the binary beside the interpreter.
    found = shutil.which("buf", path=str(Path(sys.executable).parent)) or shutil.which("buf")
    assert found, "buf is not installed: pip install -e '.[test]' (buf-bin)"
    return found


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_buf(), *args], check=False, cwd=PROTO, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "args",
    [
        ("lint",),
        ("format", "-d", "--exit-code"),
        ("breaking", "--against", "image.binpb"),
    ],
    ids=["lint", "format", "breaking"],
)
def test_buf(args: tuple[str, ...]) -> None:
    result = _run(*args)
    assert result.returncode == 0, f"buf {' '.join(args)}:\n{result.stdout}{result.stderr}"


def test_buf_breaking_catches_a_breaking_change(tmp_path: Path) -> None:
    """The check has teeth: renumbering a field of the committed schema is refused."""
    copy = tmp_path / "proto"
    shutil.copytree(PROTO, copy)
    common = copy / "phiserve" / "v1" / "common.proto"
    common.write_text(
        common.read_text().replace("optional double temperature = 2;", "optional double temperature = 99;")
    )
    result = subprocess.run(
        [_buf(), "breaking", "--against", "image.binpb"],
        check=False,
        cwd=copy,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "temperature" in result.stdout + result.stderr


def test_generated_code_is_fresh(tmp_path: Path) -> None:
    """scripts/gen_proto.sh into a temp dir must reproduce services/grpc/gen exactly."""
    out = tmp_path / "gen"
    subprocess.run(
        ["bash", str(REPO / "scripts" / "gen_proto.sh"), str(out)],
        cwd=REPO,
        check=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
        timeout=120,
    )
    expected = sorted(
        p.relative_to(out) for p in out.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    actual = sorted(
        p.relative_to(GEN) for p in GEN.rglob("*") if p.is_file() and "__pycache__" not in p.parts
    )
    assert actual == expected, "files differ: run `bash scripts/gen_proto.sh` and commit services/grpc/gen"
    stale = [str(rel) for rel in expected if not filecmp.cmp(out / rel, GEN / rel, shallow=False)]
    assert not stale, (
        f"stale generated code {stale}: run `bash scripts/gen_proto.sh` and commit services/grpc/gen"
    )


def test_generated_code_imports_as_a_package() -> None:
    from services.grpc.gen.phiserve.v1 import inference_service_pb2

    service = inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"]
    assert service.full_name == "phiserve.v1.InferenceService"
    assert [m.name for m in service.methods] == [*INFERENCE_METHODS, *BATCH_METHODS]
