# Two commands for a fresh machine:
#   make demo   creates .venv, installs, personalizes a shapes subject on the `shapes` model (local Ray), prints where results are
#   make test   creates .venv if needed, runs the whole test suite (.ci/run calls this)
SHELL := /bin/bash
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch first: the local CPU wheel here; on a CUDA machine use e.g. TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: venv demo test test-fast lint-chart clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) "$(TORCH_SPEC)"
	$(BIN)/pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

demo: venv
	HF_HUB_OFFLINE=1 $(BIN)/dreambooth run --config examples/demo.yaml

test: venv
	scripts/ensure-helm.sh >/dev/null
	HF_HUB_OFFLINE=1 $(BIN)/pytest

test-fast: venv
	HF_HUB_OFFLINE=1 $(BIN)/pytest -m "not e2e and not exclusive_ray"

clean:
	rm -rf runs .pytest_cache
