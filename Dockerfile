# Linepack image: one image for both roles (the entrypoint's first argument picks it).
#
#   docker compose build                                    # FROM python:3.11-slim, torch from pip's index
#   docker compose build --build-arg BASE_IMAGE=local/python:3.11-slim   # any image with python 3.11 + pip
#
# torch comes from a wheel placed in docker/wheels/ when there is one (the quickest, and the
# only way without a package index: copy the CPU wheel you have there), else from
# TORCH_INDEX_URL, else from pip's own configured index (empty TORCH_INDEX_URL). On Linux
# x86_64 pip's default index serves CUDA builds (what the GPU override wants); for a CPU-only
# image without a wheel, pass PyTorch's CPU wheel index (its install page gives the URL) as TORCH_INDEX_URL.
ARG BASE_IMAGE=python:3.11-slim
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, in its own layer: it is by far the largest install and changes least often.
COPY docker/wheels/ /tmp/wheels/
RUN set -eu; \
    if ls /tmp/wheels/torch-*.whl >/dev/null 2>&1; then pip install /tmp/wheels/torch-*.whl; \
    elif [ -n "${TORCH_INDEX_URL}" ]; then pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"; \
    else pip install "torch==${TORCH_VERSION}"; fi; \
    rm -rf /tmp/wheels

WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY producer ./producer
COPY trainer ./trainer
RUN pip install ".[formats]"  # Parquet and .zst corpora too (producer/formats.py)

COPY docker/entrypoint.sh /usr/local/bin/linepack-entrypoint

# Run as an unprivileged user. /runs is created here and owned by that user so a named
# volume mounted over it starts with the same owner (and stays writable).
RUN useradd --create-home --uid 1000 linepack \
    && mkdir -p /runs \
    && chown linepack:linepack /runs
USER linepack
WORKDIR /runs

# 5555: the trainer's ZeroMQ PULL socket; 8000: its diagnostics HTTP server.
EXPOSE 5555 8000
ENTRYPOINT ["linepack-entrypoint"]
CMD ["trainer"]
