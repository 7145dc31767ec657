# syntax=docker/dockerfile:1.7
# AnyDoor Serve: the HTTP service on a CUDA GPU.
#
#   docker build -t anydoor-serve .
#   docker run --gpus all -p 8000:8000 -v "$PWD/weights:/weights:ro" anydoor-serve
#
# No Docker engine runs on the development machines, so every step here is one that CI runs too
# (tests/test_deploy_manifests.py checks it): the install is scripts/setup.sh, the script .ci/run uses; the start
# command and the health check are run by the test suite against the tiny reference model.
# The one difference from CI: ANYDOOR_TORCH=cuda. The build has no GPU to detect, so setup.sh is told to install the
# CUDA 12.8 build of torch (from https://download.pytorch.org/whl/cu128, the CUDA version of BASE_IMAGE and
# cog.yaml); it fails the build if it ends up with a CPU build. CI gets the CPU build of the same torch version.
# --build-arg TORCH_SPEC="torch==... --index-url ..." installs exactly that instead.

ARG BASE_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
FROM ${BASE_IMAGE}

ARG TORCH_SPEC=""
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Python 3.11, the version CI and the Cog image use; Ubuntu 22.04 ships 3.10, so it comes from the deadsnakes PPA.
# libgl/libglib are not needed: the project uses opencv-python-headless.
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && ln -sf /usr/bin/python3.11 /usr/local/bin/python3 \
    && apt-get purge -y --auto-remove software-properties-common gpg-agent \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /app
COPY pyproject.toml README.md ./
COPY scripts/setup.sh scripts/setup.sh
COPY model model
COPY service service
COPY client client
COPY anydoor_batch anydoor_batch

# The CI install (.ci/run runs the same script). The pip cache mount keeps the multi-GB torch wheel between builds.
# COPY service carries service/static (the /docs and /redoc assets) with the code.
RUN --mount=type=cache,target=/root/.cache/pip ANYDOOR_TORCH=cuda TORCH_SPEC="${TORCH_SPEC}" bash scripts/setup.sh \
    && .venv/bin/anydoor --help > /dev/null

# Weights come from a mounted volume (/weights) or, with ANYDOOR_WEIGHTS=https://..., are downloaded once on start
# into the cache volume (/cache): resumable, checked against ANYDOOR_WEIGHTS_SHA256.
RUN useradd --create-home --uid 10001 --user-group anydoor \
    && mkdir -p /weights /cache \
    && chown anydoor:anydoor /cache
USER 10001:10001
VOLUME ["/cache"]

ENV PATH=/app/.venv/bin:${PATH} \
    ANYDOOR_HOST=0.0.0.0 \
    ANYDOOR_PORT=8000 \
    ANYDOOR_WEIGHTS=/weights/anydoor-fp16.safetensors \
    ANYDOOR_CACHE_DIR=/cache \
    ANYDOOR_DEVICE=auto
EXPOSE 8000

# Ready only after the weights are loaded and the warm-up generation passed; a large download on first start can
# take minutes, hence the long start period.
HEALTHCHECK --interval=15s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health/ready' % os.environ.get('ANYDOOR_PORT', '8000'), timeout=4)"]

# `docker stop` sends SIGTERM: the service drains (ANYDOOR_SHUTDOWN_GRACE_S); give it that long with --time.
STOPSIGNAL SIGTERM
CMD ["anydoor", "serve"]
