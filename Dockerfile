# qwen-edit RunPod serverless worker (README, "RunPod serverless worker").
#
# Built for RTX 50xx / RTX PRO 6000 Blackwell (SM 120): CUDA 12.8, a cu128 torch build (the first with
# SM 120 kernels) and the Nunchaku wheel built for that torch and Python. The same image runs the int4
# files on Ampere/Ada cards (SM 80/86/89); Hopper has no Nunchaku kernels (README, GPU types).
# Models are not baked in: they live on the network volume (/runpod-volume, configs/runpod-serverless.yaml).
#
#   docker build -t qwen-edit-worker .
#   docker run --gpus all -v /path/to/volume:/runpod-volume qwen-edit-worker
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

# torch and Nunchaku move together: the wheel's "+torchX.Y" and "cpXY" must match what is installed.
ARG TORCH_VERSION=2.8.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ARG NUNCHAKU_VERSION=1.0.1
ARG NUNCHAKU_TORCH=2.8
ARG PY_TAG=cp312
ARG NUNCHAKU_WHEEL=https://github.com/nunchaku-tech/nunchaku/releases/download/v${NUNCHAKU_VERSION}/nunchaku-${NUNCHAKU_VERSION}+torch${NUNCHAKU_TORCH}-${PY_TAG}-${PY_TAG}-linux_x86_64.whl

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Ubuntu 24.04's Python is 3.12 (cp312); a venv because the system Python is externally managed.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install --upgrade pip

RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
    && pip install "${NUNCHAKU_WHEEL}"

WORKDIR /app
COPY pyproject.toml README.md test_input.json ./
COPY qwen_edit ./qwen_edit
COPY runners ./runners
COPY configs ./configs
# The worker extra pins the diffusers line Nunchaku's model code expects (README, Versions); the torch
# installed above satisfies the package's torch requirement, so pip keeps it.
RUN pip install ".[worker]"

# Check the image before it ships: the SDK's own test mode runs test_input.json on the CPU demo model.
RUN QWEN_EDIT_DEMO=1 QWEN_EDIT_CACHE=/tmp/qwen-edit-selftest python runners/handler.py \
    && rm -rf /tmp/qwen-edit-selftest

# With compile: true, inductor's compiled kernels persist on the volume, so a cold worker reuses them
# (first edit 48 s -> 14.5 s on an H100, benchmarks/RESULTS.md). Bytecode for the installed packages
# is built above by pip (imports are seconds of every cold start).
ENV QWEN_EDIT_CONFIG=/app/configs/runpod-serverless.yaml \
    QWEN_EDIT_INPUT_DIRS=/runpod-volume/ComfyUI/input:/runpod-volume/input \
    HF_HUB_CACHE=/runpod-volume/huggingface-cache/hub \
    HF_HUB_OFFLINE=1 \
    TORCHINDUCTOR_CACHE_DIR=/runpod-volume/qwen-edit/inductor-cache

CMD ["python", "-u", "runners/handler.py"]
