# syntax=docker/dockerfile:1
# capsdist training image: CUDA PyTorch base, the package installed, `python -m capsdist.train` as entry point.
#   docker build -t capsdist .
#   docker run --gpus all -v "$PWD/runs:/app/runs" capsdist fit --config configs/mnist.yaml
# torch comes from the base image (pyproject only asks torch>=2.3); pick another tag with --build-arg BASE_IMAGE=...
ARG BASE_IMAGE=pytorch/pytorch:2.7.1-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CAPSDIST_MNIST_DIR=/app/data/mnist

WORKDIR /app

# Dependencies in their own layer: rebuilt only when pyproject.toml changes, not on every code edit.
COPY pyproject.toml README.md ./
COPY capsdist/__init__.py capsdist/
COPY data_prep/__init__.py data_prep/
RUN pip install . && pip uninstall -y capsdist

# The package itself (no dependency resolution), then the configs and the shipped MNIST copy.
COPY capsdist/ capsdist/
COPY data_prep/ data_prep/
RUN pip install --no-deps . && rm -rf build capsdist.egg-info
COPY configs/ configs/
COPY data/mnist/ data/mnist/

# Unprivileged user; runs/ (checkpoints, CSV, W&B offline files) is the one writable place: mount it.
RUN groupadd --gid 10001 capsdist \
    && useradd --no-log-init --create-home --uid 10001 --gid 10001 capsdist \
    && mkdir runs && chown 10001:10001 runs
USER 10001:10001

ENTRYPOINT ["python", "-m", "capsdist.train"]
CMD ["fit", "--config", "configs/quickstart.yaml"]
