# async-rlhf image: the same steps as `make install`, then the quickstart as the default command.
# GPU (default): CUDA base and the `gpu` extra (CUDA vLLM). The host needs the NVIDIA driver and the
# NVIDIA container toolkit (`docker run --gpus all ...`); torch and vLLM bring their own CUDA libraries.
# CPU:  docker build --build-arg BASE=python:3.11-slim --build-arg EXTRAS=cpu,logging,dev -t async-rlhf:cpu .
# On a Ray cluster the same image runs `ray start` on every node (README "On a GPU cluster").
# CPU runs publish weights through /dev/shm (weight_sync.transport: shm), slots x the policy's size: Docker's
# default 64 MB is too small beyond the quickstart, so run with e.g. `docker run --shm-size=4g ...`.
ARG BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE}
ARG EXTRAS=gpu,logging,dev
ENV DEBIAN_FRONTEND=noninteractive
# Python only where the base has none (the CUDA image); python:3.11-slim keeps its own.
RUN apt-get update \
 && apt-get install -y --no-install-recommends make gcc g++ \
      $(command -v python3 >/dev/null || echo python3 python3-venv python3-dev) \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml Makefile README.md ./
COPY async_rlhf async_rlhf
COPY actors actors
COPY learners learners
COPY reward_models reward_models
COPY configs configs
COPY examples examples
COPY bench bench
COPY scripts scripts
COPY tests tests
RUN make install EXTRAS=${EXTRAS}
ENV PATH=/app/.venv/bin:${PATH}
ENTRYPOINT ["async-rlhf"]
CMD ["train", "configs/quickstart.yaml"]
