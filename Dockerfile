# syntax=docker/dockerfile:1
#
# lstm-serve images. Build from the repository root:
#
#   docker build -t lstm-serve:cpu .                  # CPU image (the default target)
#   docker build -t lstm-serve:cuda --target cuda .   # CUDA image (needs the NVIDIA runtime to use the GPU)
#
# Both images serve the bundled models from /opt/lstm-serve/models (read-only, part of the image).
# Mount another repository at /models and set LSTM_SERVE_MODEL_REPOSITORY=/models to serve it
# instead. Sessions are snapshotted to /snapshots (a volume) so a restarted container continues
# them. Every LSTM_SERVE_* setting is listed in docs/operations.md.

# One ONNX Runtime release for both images. onnxruntime-gpu 1.31 is built for CUDA 13 and cuDNN 9
# (its CUDA provider links libcublas.so.13 / libcudart.so.13), so CUDA_IMAGE must be a CUDA 13
# runtime image with cuDNN 9; change the two together.
ARG ONNXRUNTIME_VERSION=1.31.1
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------
# CUDA builder: same project, onnxruntime-gpu, on the Python of the CUDA image's Ubuntu (3.12),
# so the venv's interpreter is the one the CUDA runtime image has.
# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS cuda-builder
ARG ONNXRUNTIME_VERSION
ARG DEBIAN_FRONTEND=noninteractive
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# Ubuntu's packages are not pinned: the CUDA base image tag pins the distribution release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
# The gpu extra (CuPy) keeps every session's h and c in GPU memory (LSTM_SERVE_STATE_ON_DEVICE).
# ".[gpu]" is this project with an extra, not a registry package to pin.
# hadolint ignore=DL3013
RUN pip install "onnxruntime-gpu==${ONNXRUNTIME_VERSION}" \
    && pip install ".[gpu]" \
    && pip check \
    && python -c "import onnxruntime; assert 'CUDAExecutionProvider' in onnxruntime.get_available_providers(), onnxruntime.get_available_providers()" \
    && python -c "import cupy"

# ---------------------------------------------------------------------------------------------
# CUDA runtime image: `docker build --target cuda`. Run with the NVIDIA container runtime
# (`docker run --gpus all`, or the compose `gpu` profile).
# ---------------------------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS cuda
LABEL org.opencontainers.image.title="lstm-serve" \
      org.opencontainers.image.description="Stateful gRPC streaming inference for LSTM models on ONNX Runtime (CUDA)" \
      org.opencontainers.image.licenses="Apache-2.0"
ARG DEBIAN_FRONTEND=noninteractive
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 lstm \
    && useradd --system --uid 10001 --gid lstm --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin lstm \
    && mkdir -p /models /snapshots \
    && chown lstm:lstm /snapshots
COPY --from=cuda-builder /opt/venv /opt/venv
COPY models /opt/lstm-serve/models
# LSTM_SERVE_DEVICE=cuda: a GPU image that cannot see its GPU fails at start instead of quietly
# serving from the CPU. Set LSTM_SERVE_DEVICE=auto to allow the CPU fallback.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LSTM_SERVE_HOST=0.0.0.0 \
    LSTM_SERVE_PORT=50051 \
    LSTM_SERVE_METRICS_HOST=0.0.0.0 \
    LSTM_SERVE_METRICS_PORT=9400 \
    LSTM_SERVE_HEALTH_PORT=50052 \
    LSTM_SERVE_MODEL_REPOSITORY=/opt/lstm-serve/models \
    LSTM_SERVE_SNAPSHOT_DIR=/snapshots \
    LSTM_SERVE_DEVICE=cuda
VOLUME ["/models", "/snapshots"]
USER 10001:10001
WORKDIR /opt/lstm-serve
EXPOSE 50051 9400
# The health check asks the plaintext, loopback-only health port, so it works whatever TLS or
# mTLS the main port requires.
HEALTHCHECK --interval=15s --timeout=5s --start-period=90s --retries=3 \
    CMD ["/bin/sh", "-c", "lstm-serve health --target \"127.0.0.1:${LSTM_SERVE_HEALTH_PORT:-50052}\" --timeout 3 || exit 1"]
ENTRYPOINT ["lstm-serve"]
CMD ["serve"]

# ---------------------------------------------------------------------------------------------
# CPU builder: a venv with the project and its runtime dependencies only (no torch, no dev tools),
# the way `make serve` installs it.
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ARG ONNXRUNTIME_VERSION
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service ./service
# The CPU image installs plain `onnxruntime` instead of the default `onnxruntime-gpu`
# (pyproject.toml picks -gpu on Linux x86_64): the CPU build is ~20 MB against ~340 MB, and
# without the CUDA libraries, which are not in this image, -gpu would run on the CPU anyway.
# So: the runtime dependencies minus ONNX Runtime, then onnxruntime, then the project --no-deps.
# (`pip check` would name the missing onnxruntime-gpu, so it runs in the CUDA builder only.)
RUN python -c "import tomllib; deps = tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']; print('\n'.join(d for d in deps if not d.startswith('onnxruntime')))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt "onnxruntime==${ONNXRUNTIME_VERSION}" \
    && pip install --no-deps . \
    && python -c "import onnxruntime, lstm_serve.server.app; print('onnxruntime', onnxruntime.__version__, onnxruntime.get_available_providers())"

# ---------------------------------------------------------------------------------------------
# CPU runtime image: the default target, so it stays the last stage.
# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS cpu
LABEL org.opencontainers.image.title="lstm-serve" \
      org.opencontainers.image.description="Stateful gRPC streaming inference for LSTM models on ONNX Runtime (CPU)" \
      org.opencontainers.image.licenses="Apache-2.0"
RUN groupadd --system --gid 10001 lstm \
    && useradd --system --uid 10001 --gid lstm --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin lstm \
    && mkdir -p /models /snapshots \
    && chown lstm:lstm /snapshots
COPY --from=builder /opt/venv /opt/venv
# Bundled models, owned by root: the server only reads them.
COPY models /opt/lstm-serve/models
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    LSTM_SERVE_HOST=0.0.0.0 \
    LSTM_SERVE_PORT=50051 \
    LSTM_SERVE_METRICS_HOST=0.0.0.0 \
    LSTM_SERVE_METRICS_PORT=9400 \
    LSTM_SERVE_HEALTH_PORT=50052 \
    LSTM_SERVE_MODEL_REPOSITORY=/opt/lstm-serve/models \
    LSTM_SERVE_SNAPSHOT_DIR=/snapshots \
    LSTM_SERVE_DEVICE=cpu
VOLUME ["/models", "/snapshots"]
USER 10001:10001
WORKDIR /opt/lstm-serve
EXPOSE 50051 9400
# Health from the plaintext, loopback-only health port, whatever TLS the main port requires.
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/bin/sh", "-c", "lstm-serve health --target \"127.0.0.1:${LSTM_SERVE_HEALTH_PORT:-50052}\" --timeout 3 || exit 1"]
ENTRYPOINT ["lstm-serve"]
CMD ["serve"]
