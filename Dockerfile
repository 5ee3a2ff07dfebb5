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

# torch, torchvision and Nunchaku are one set, pinned together: the wheel's "+torchX.Y" must be the
# installed torch's major.minor and its "cpXY" this Python. This is the set known to work on RunPod's
# RTX 5090 template: Nunchaku 1.0.2's torch 2.9 / Python 3.12 wheel, whose release build installs
# torch==2.9 and torchvision==0.24 (2.9.0 and 0.24.0) from the cu128 index.
ARG TORCH_VERSION=2.9.0
ARG TORCHVISION_VERSION=0.24.0
ARG TORCH_CUDA=cu128
ARG TORCH_INDEX=https://download.pytorch.org/whl/${TORCH_CUDA}
ARG NUNCHAKU_VERSION=1.0.2
ARG NUNCHAKU_TORCH=2.9
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

# torch and torchvision first, from the CUDA index; then every later pip install runs with them as
# constraints, so nothing can replace them (Nunchaku's wheel needs torchvision>=0.20: with no torchvision
# installed, pip once fetched the newest one and upgraded torch under the wheel's extension).
RUN pip install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" --index-url "${TORCH_INDEX}" \
    && printf 'torch==%s\ntorchvision==%s\n' "${TORCH_VERSION}" "${TORCHVISION_VERSION}" > /opt/torch-constraints.txt \
    && pip install -c /opt/torch-constraints.txt "${NUNCHAKU_WHEEL}"

WORKDIR /app
COPY pyproject.toml README.md test_input.json ./
COPY qwen_edit ./qwen_edit
COPY runners ./runners
COPY configs ./configs
# The worker extra pins the diffusers line Nunchaku's model code expects (README, Versions); the
# constraints keep the torch and torchvision installed above.
RUN pip install -c /opt/torch-constraints.txt ".[worker]"

# Fail the build unless torch and torchvision are still the ones installed first, the wheel's tags match
# them and this Python, and nunchaku and its compiled extension import (no GPU needed for that). Without
# this, a mismatched wheel only shows at run time, as backend "auto" falling back to the portable one.
RUN python runners/check_image.py --torch "${TORCH_VERSION}+${TORCH_CUDA}" \
        --torchvision "${TORCHVISION_VERSION}+${TORCH_CUDA}" --wheel "${NUNCHAKU_WHEEL}"

# Check the image before it ships: the SDK's own test mode runs test_input.json on the CPU demo model.
RUN QWEN_EDIT_DEMO=1 QWEN_EDIT_CACHE=/tmp/qwen-edit-selftest python -m runners.worker \
    && rm -rf /tmp/qwen-edit-selftest

# With compile: true, inductor's compiled kernels persist on the volume, so a cold worker reuses them
# (first edit 48 s -> 14.5 s on an H100, benchmarks/RESULTS.md). Bytecode for the installed packages
# is built above by pip (imports are seconds of every cold start).
ENV QWEN_EDIT_CONFIG=/app/configs/runpod-serverless.yaml \
    QWEN_EDIT_INPUT_DIRS=/runpod-volume/ComfyUI/input:/runpod-volume/input \
    HF_HUB_CACHE=/runpod-volume/huggingface-cache/hub \
    HF_HUB_OFFLINE=1 \
    TORCHINDUCTOR_CACHE_DIR=/runpod-volume/qwen-edit/inductor-cache

CMD ["python", "-u", "-m", "runners.worker"]
