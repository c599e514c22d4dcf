# syntax=docker/dockerfile:1
#
# Two images from one file:
#   --target api     the API, the scheduler, migrations and optuna-dashboard (.[server])
#   --target worker  a device worker: measurement and quality signals only (.[worker]);
#                    no web stack, no database driver, no Optuna
#
# torch is installed first, pinned, from the CPU wheel index, so that pip never pulls a
# multi-GB CUDA build. For a CUDA worker image pass the CUDA wheel index that matches the
# host driver, e.g.
#   docker build --target worker \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t fitnas-worker-cuda .

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS base
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}" \
 && useradd --create-home --uid 10001 --shell /usr/sbin/nologin fitnas \
 && mkdir -p /var/lib/fitnas/exports /var/lib/fitnas/artifacts \
 && chown -R fitnas:fitnas /var/lib/fitnas
WORKDIR /opt/fitnas
COPY pyproject.toml README.md ./
COPY blocks ./blocks
COPY search ./search
COPY service ./service
COPY migrations ./migrations

FROM base AS worker
# onnxruntime-gpu for a CUDA worker (its ONNX Runtime path then runs on the GPU); the two
# packages provide the same module, so only one may be installed.
ARG ONNXRUNTIME_PACKAGE=onnxruntime
RUN pip install ".[worker]" \
 && if [ "${ONNXRUNTIME_PACKAGE}" != "onnxruntime" ]; then \
      pip uninstall -y onnxruntime && pip install "${ONNXRUNTIME_PACKAGE}"; \
    fi \
 && mkdir -p /var/lib/fitnas/tokens && chown fitnas:fitnas /var/lib/fitnas/tokens
USER fitnas
WORKDIR /var/lib/fitnas
# The token comes from the environment (FITNAS_WORKER_TOKEN) or a file
# (FITNAS_WORKER_TOKEN_FILE), never the command line.
CMD ["fitnas", "worker", "--help"]

FROM base AS api
RUN pip install ".[server]" \
 && mkdir -p /var/lib/fitnas/tokens && chown fitnas:fitnas /var/lib/fitnas/tokens
USER fitnas
WORKDIR /var/lib/fitnas
ENV FITNAS_EXPORT_DIR=/var/lib/fitnas/exports
EXPOSE 8000 8080
CMD ["fitnas", "serve", "--host", "0.0.0.0", "--port", "8000"]
