# lmkit: `make demo` trains a small model end to end on CPU; `make test` runs the test suite.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export PYTHONDONTWRITEBYTECODE := 1

# torch: the CPU build where there is no GPU, the default (CUDA) build where there is one.
# Here `torch==2.13.0` resolves to a CPU wheel on local disk; elsewhere add TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu.
HAS_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
TORCH_SPEC ?= torch>=2.4,<3
else
TORCH_SPEC ?= torch==2.13.0
endif
TORCH_INDEX_URL ?=

.PHONY: help install demo test test-fast quality style clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: $(VENV)/.installed  ## create .venv with lmkit installed editable (CPU torch without a GPU)

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL))
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

test: install  ## run the whole test suite (slow end-to-end tests included)
	$(BIN)/python -m pytest -n 2 --dist loadgroup

test-fast: install  ## the unit tests only
	$(BIN)/python -m pytest -n 2 -m "not slow"

quality: install  ## lint
	$(BIN)/ruff check src tests benchmarks

clean:  ## remove runs, hub, caches and the environment
	rm -rf $(VENV) runs hub exports .pytest_cache .hypothesis src/*.egg-info
