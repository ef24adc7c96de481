# syntax=docker/dockerfile:1
# capsdist training image: slim Python, the pinned torch wheel, the package installed, `python -m capsdist.train` as
# entry point (docs/scaling.md, "Docker").
#   docker build -t capsdist .
#   mkdir -p runs && docker run --gpus all --user "$(id -u):$(id -g)" -v "$PWD/runs:/app/runs" capsdist fit --config configs/mnist.yaml
#
# One torch: the base holds none, so the pinned wheel is the image's only torch (the former pytorch/pytorch base held
# 2.7.1, under pyproject's torch>=2.13 floor, and every build installed a second torch on top). TORCH is the floor,
# the version tested (docs/index.md, "Dependency floors"); PyPI's release files never change, so the version pins
# the bytes. PyPI's Linux wheel of torch 2.13.0 is the CUDA 13.0 build, its CUDA libraries pip packages
# (cuda-toolkit, cuDNN): the host needs an NVIDIA driver >= 580 and the NVIDIA container toolkit, and the image also
# runs on CPUs. A CPU-only image, without the CUDA packages (far smaller):
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu -t capsdist:cpu .
#
# The base is pinned by its exact tag (no digest could be resolved where this was written: no registry access).
# To pin its bytes, resolve the digest where Docker Hub is reachable and build with it:
#   docker buildx imagetools inspect python:3.12.11-slim-bookworm     # the "Digest: sha256:..." line
#   docker build --build-arg BASE_IMAGE=python:3.12.11-slim-bookworm@sha256:<digest> -t capsdist .
ARG BASE_IMAGE=python:3.12.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://pypi.org/simple

# HOME is writable whatever uid runs the image (`--user "$(id -u):$(id -g)"`: W&B and torch keep settings and caches
# there); USER names it for torch's cache folders when the uid has no passwd entry.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CAPSDIST_MNIST_DIR=/app/data/mnist \
    HOME=/home/capsdist \
    USER=capsdist

WORKDIR /app

# torch in its own layer: the largest, rebuilt only when TORCH or TORCH_INDEX change.
RUN pip install --index-url "${TORCH_INDEX}" "${TORCH}"

# Dependencies in their own layer: rebuilt only when pyproject.toml changes, not on every code edit; the torch above
# meets the floor, so pip keeps it.
COPY pyproject.toml README.md LICENSE ./
COPY capsdist/__init__.py capsdist/
# pyproject lists the packages and maps configs/ and pretrained/ into the wheel: their folders must exist
RUN mkdir -p capsdist/bench capsdist/data capsdist/prep configs/ablation configs/strategy pretrained \
    && pip install . && pip uninstall -y capsdist

# The package with its configs and pretrained weights (no dependency resolution), the checkout's data_prep
# aliases and the shipped MNIST copy.
COPY capsdist/ capsdist/
COPY configs/ configs/
COPY pretrained/ pretrained/
RUN pip install --no-deps . && rm -rf build capsdist.egg-info
COPY data_prep/ data_prep/
COPY data/mnist/ data/mnist/

# Unprivileged user (uid 10001); runs/ (checkpoints, CSV, W&B offline files) is the one place written: mount a host
# folder there that the running uid may write (docs/scaling.md, "Docker").
RUN groupadd --gid 10001 capsdist \
    && useradd --no-log-init --create-home --uid 10001 --gid 10001 capsdist \
    && chmod 1777 /home/capsdist \
    && mkdir runs && chown 10001:10001 runs
USER 10001:10001

ENTRYPOINT ["python", "-m", "capsdist.train"]
CMD ["fit", "--config", "configs/quickstart.yaml"]
