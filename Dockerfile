# syntax=docker/dockerfile:1
# capsdist training image: CUDA PyTorch base, the package installed, `python -m capsdist.train` as entry point.
#   docker build -t capsdist .
#   docker run --gpus all -v "$PWD/runs:/app/runs" capsdist fit --config configs/mnist.yaml
# torch comes from the base image when it meets pyproject's floor (torch>=2.13, the tested one; see docs/index.md,
# "Dependency floors"), else pip installs a newer one; pick another tag with --build-arg BASE_IMAGE=...
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CAPSDIST_MNIST_DIR=/app/data/mnist

WORKDIR /app

# Dependencies in their own layer: rebuilt only when pyproject.toml changes, not on every code edit.
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

# Unprivileged user; runs/ (checkpoints, CSV, W&B offline files) is the one writable place: mount it.
RUN groupadd --gid 10001 capsdist \
    && useradd --no-log-init --create-home --uid 10001 --gid 10001 capsdist \
    && mkdir runs && chown 10001:10001 runs
USER 10001:10001

ENTRYPOINT ["python", "-m", "capsdist.train"]
CMD ["fit", "--config", "configs/quickstart.yaml"]
