# Linepack image: one image for both roles (the entrypoint's first argument picks it).
#   CPU (default):  docker build -t linepack:cpu .
#   GPU trainer:    docker build -t linepack:gpu --build-arg TORCH_INDEX_URL=https://pypi.org/simple .
#                   (PyPI's Linux torch wheels are CUDA builds; docker-compose.gpu.yml does this)
FROM python:3.11-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, in its own layer: it is by far the largest download and changes least often.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY shared ./shared
COPY producer ./producer
COPY trainer ./trainer
RUN pip install .

COPY docker/entrypoint.sh /usr/local/bin/linepack-entrypoint

# Run as an unprivileged user. /runs is created here and owned by that user so a named
# volume mounted over it starts with the same owner.
RUN useradd --create-home --uid 1000 linepack \
    && mkdir -p /runs \
    && chown linepack:linepack /runs
USER linepack
WORKDIR /runs

# 5555: the trainer's ZeroMQ PULL socket; 8000: its diagnostics HTTP server.
EXPOSE 5555 8000
ENTRYPOINT ["linepack-entrypoint"]
CMD ["trainer"]
