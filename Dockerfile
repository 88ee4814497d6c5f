# clipkit on a CUDA base image: `docker build -t clipkit .`
# PyTorch's CUDA 13 wheels (pinned in requirements/lock.txt with everything else the tests ran with) bring
# their own CUDA libraries; the base image supplies the CUDA runtime environment and cuDNN.
FROM nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

WORKDIR /opt/clipkit
# Dependencies first, so code changes do not reinstall PyTorch.
COPY requirements/lock.txt requirements/lock.txt
RUN pip install -r requirements/lock.txt

COPY pyproject.toml README.md ./
COPY src src
COPY conf conf
RUN pip install --no-deps . \
    && clipkit --help > /dev/null

WORKDIR /workspace
# `docker run --gpus all --entrypoint accelerate IMAGE launch -m clipkit.train ...` for training.
ENTRYPOINT ["clipkit"]
CMD ["--help"]
