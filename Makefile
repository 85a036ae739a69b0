# Two entry points on a fresh machine: `make demo` and `make test`. Each creates .venv and installs what it needs.
# TORCH is the torch requirement pip installs; CI pins the CPU build (see .ci/run).
PYTHON ?= python3
TORCH ?= torch
VENV := .venv
BIN := $(VENV)/bin
# The MNIST files beside this checkout (CI and the dev machines have them); elsewhere the lab downloads into the
# user cache, or falls back to its shipped sample.
SHARED_MNIST := $(abspath ../shared/data/mnist)
ifneq ($(wildcard $(SHARED_MNIST)),)
NORMLAB_DATA ?= $(SHARED_MNIST)
export NORMLAB_DATA
endif

.PHONY: demo test lint bench-cpu bench-gpu clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[lab]"
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[dev,gpu,lab]"
	touch $@

demo: $(VENV)/.installed-demo
	$(BIN)/normlab mnist --quick

test: $(VENV)/.installed-test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -n 2 -q tests

bench-cpu: $(VENV)/.installed-test
	$(BIN)/python benchmarks/cpu.py

bench-gpu:
	$(PYTHON) benchmarks/gpu.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
