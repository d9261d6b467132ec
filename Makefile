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

# The demo's corpus: Chinese poems and quotes from the Debian package fortunes-zh (raw fortune files).
FORTUNES := /usr/share/games/fortunes
DATA ?=
DEMO_RUN ?= runs/quickstart-zh
DEMO_ARGS ?=
RECIPE ?= recipes/quickstart-zh/config.yaml
ARGS ?=
MODEL ?= runs/quickstart-zh

.PHONY: help install demo demo-data chat-data corpora browser train eval test test-fast quality clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

install: $(VENV)/.installed  ## create .venv with lmkit installed editable (CPU torch without a GPU)

$(VENV)/.installed: setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)" $(if $(TORCH_INDEX_URL),--extra-index-url $(TORCH_INDEX_URL))
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: install demo-data  ## train a small Chinese char-level model end to end on CPU (a few minutes), publish it, sample it
	rm -rf $(DEMO_RUN)
	$(BIN)/lmkit train recipes/quickstart-zh/config.yaml training.output_dir=$(DEMO_RUN) \
		$(if $(DATA),"data.files=[$(DATA)]" data.doc_separator=line) $(DEMO_ARGS)
	@echo; echo "== three continuations from the published model (hub: demo/zh-char) =="
	@for prompt in 床前明月光 人生 春风; do \
		$(BIN)/lmkit generate demo/zh-char --prompt "$$prompt" --max-new-tokens 40 --seed 1 2>/dev/null; echo; done
	@echo; echo "== serve it to applications (OpenAI-compatible API, playground page at http://127.0.0.1:8000/) =="
	@echo "  $(BIN)/lmkit serve demo/zh-char"
	@echo; echo "== next, a chat model (recipes/chat-zh): make chat-data && $(BIN)/lmkit train recipes/chat-zh/config.yaml, then =="
	@echo "  $(BIN)/lmkit serve demo/zh-chat"
	@echo "  curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\"
	@echo "    -d '{\"model\": \"demo/zh-chat\", \"messages\": [{\"role\": \"user\", \"content\": \"请背诵《静夜思》。\"}]}'"

demo-data:  # the demo corpus: installs fortunes-zh when running as root, otherwise says what to do
ifeq ($(DATA),)
	@test -f $(FORTUNES)/tang300 || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes-zh; \
		else echo "make demo: the corpus is the Debian package fortunes-zh, and installing it needs root."; \
			echo "  run: sudo apt-get install fortunes-zh   or use your own text: make demo DATA=path/to/corpus.jsonl"; exit 2; fi; }
else
	@test -e "$(DATA)" || { echo "make demo: DATA=$(DATA) does not exist"; exit 2; }
endif

chat-data:  ## conversations about Tang poems for recipes/chat-zh: data/chat-zh.jsonl, from fortunes-zh
	@test -f $(FORTUNES)/tang300 || { echo "make chat-data: the poems are the Debian package fortunes-zh: make corpora"; \
		exit 2; }
	$(PYTHON) recipes/chat-zh/make_conversations.py --fortunes $(FORTUNES)/tang300 --output data/chat-zh.jsonl

# The tour's English (fortunes) and Chinese (fortunes-zh); Russian (fortunes-ru) for the sizing study, German
# (fortunes-de) for remaking the test fixtures.
CORPORA_PACKAGES := fortunes fortunes-zh fortunes-ru fortunes-de

corpora:  ## install the corpora: Debian packages fortunes, fortunes-zh, fortunes-ru, fortunes-de, as root
	@test -f $(FORTUNES)/computers -a -f $(FORTUNES)/literature -a -f $(FORTUNES)/tang300 -a -f $(FORTUNES)/ru/love \
		-a -f $(FORTUNES)/de/witze || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(CORPORA_PACKAGES); \
		else echo "make corpora: the corpora are the Debian packages $(CORPORA_PACKAGES), and installing them needs root."; \
			echo "  run: sudo apt-get install $(CORPORA_PACKAGES)"; exit 2; fi; }

browser:  ## install the headless browser the playground test drives: Debian packages chromium and chromium-driver, as root
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
		else echo "make browser: the playground test drives Debian's chromium, and installing it needs root."; \
			echo "  run: sudo apt-get install chromium chromium-driver   (without it the test is skipped, except in CI)"; exit 2; fi; }

train: install  ## train a recipe: make train RECIPE=recipes/en-bpe/config.yaml ARGS="training.max_steps=100"
	$(BIN)/lmkit train $(RECIPE) $(ARGS)

eval: install  ## evaluate a run on its held-out split: make eval MODEL=runs/quickstart-zh (a hub name needs ARGS="--data PATH")
	$(BIN)/lmkit eval $(MODEL) $(ARGS)

test: install corpora  ## run the whole test suite (slow end-to-end tests included; the README test needs the corpora)
	$(BIN)/python -m pytest -n 2 --dist loadgroup

test-fast: install  ## the unit tests only
	$(BIN)/python -m pytest -n 2 -m "not slow"

quality: install  ## lint: ruff with pyproject.toml's rules (what CI and the pre-commit hook run)
	$(BIN)/ruff check src tests benchmarks

clean:  ## remove runs, hub, caches and the environment
	rm -rf $(VENV) runs hub exports .pytest_cache .hypothesis src/*.egg-info
