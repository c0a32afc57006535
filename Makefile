# Two entry points: `make train` (the built-in tiny default, CPU, minutes) and `make test`.
# Each sets up a local virtual environment first; the set-up is idempotent and re-runs only when
# pyproject.toml changes.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# On a machine without an NVIDIA GPU the CPU build of torch goes in before the package, so that the
# package's torch requirement is already met and pip never pulls the multi-GB CUDA build. The pin names the
# CPU build (+cpu), which PyPI does not carry: where pip's own indexes and links lack it, it comes from
# PyTorch's index of CPU wheels (TORCH_CPU_INDEX); macOS wheels are CPU builds without the suffix. Point
# TORCH_CPU at another pin where needed.
TORCH_CPU ?= $(if $(filter Darwin,$(shell uname -s)),torch==2.13.0,torch==2.13.0+cpu)
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
ARGS ?=
# Test processes (pytest-xdist); each gets an equal share of the cores for torch. 0 runs the tests in this process.
TEST_WORKERS ?= 2

.PHONY: setup train test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	if ! command -v nvidia-smi >/dev/null 2>&1 && ! $(PY) -c "import torch" >/dev/null 2>&1; then \
		$(PY) -m pip install -q "$(TORCH_CPU)" 2>/dev/null \
			|| $(PY) -m pip install -q "$(TORCH_CPU)" --extra-index-url $(TORCH_CPU_INDEX); fi
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

train: $(STAMP)
	$(PY) train.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS) $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) .cache logs outputs multirun
