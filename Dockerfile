# CPU image of async-rlhf: the same steps as `make install`, then the quickstart as the default command.
# (The GPU image with the `gpu` extra is part of the GPU cluster work; see the README's Status.)
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends make gcc g++ && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml Makefile README.md ./
COPY async_rlhf async_rlhf
COPY actors actors
COPY learners learners
COPY reward_models reward_models
COPY configs configs
COPY tests tests
RUN make install
ENTRYPOINT [".venv/bin/async-rlhf"]
CMD ["train", "configs/quickstart.yaml"]
