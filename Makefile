# Entry points on a fresh machine: `make demo`, `make test` and `make report`. Each creates .venv and installs what it
# needs.
# TORCH is the torch requirement pip installs; CI pins the CPU build (see .ci/run). On a machine without a GPU:
#   make demo TORCH="torch --index-url https://download.pytorch.org/whl/cpu"
# installs the CPU build (torch 2.13.0+cpu: 754 MB installed) instead of the default CUDA one (a 5.5 GB .venv).
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

.PHONY: demo test report lint bench-cpu bench-gpu clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Not --quiet: torch is a large download (the CUDA build is GBs; see the README for the CPU one) and pip's progress
# shows it is moving. TORCH is unquoted so that it may carry pip options: TORCH="torch --index-url URL".
$(VENV)/.installed-demo: pyproject.toml | $(BIN)/python
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -e ".[lab]"
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet "$(TORCH)" -e ".[dev,gpu,lab]"
	touch $@

demo: $(VENV)/.installed-demo
	$(BIN)/normlab mnist --quick

# `make report`: the --quick size of every registered experiment (asked of the registry, so a new experiment joins
# without an edit here), each into a fresh $(RESULTS)/<name>, then one HTML page of them all: $(REPORT).
RESULTS ?= results/quick
REPORT ?= $(RESULTS)/report.html
report: $(VENV)/.installed-demo
	@test -n "$(strip $(RESULTS))" || { echo "make report: RESULTS is empty (it names the folder to fill)" >&2; exit 2; }
	@names="$$($(BIN)/python -c 'from normlab.lab import registry; print(*registry.experiments())')" && \
	for name in $$names; do \
		echo "== normlab $$name --quick --out $(RESULTS)/$$name"; \
		rm -rf "$(RESULTS)/$$name" && $(BIN)/normlab $$name --quick --out "$(RESULTS)/$$name" || exit 1; \
	done
	$(BIN)/normlab report $(RESULTS) --out $(REPORT)

test: $(VENV)/.installed-test
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest -n 2 -q tests

bench-cpu: $(VENV)/.installed-test
	$(BIN)/python benchmarks/cpu.py

bench-gpu:
	$(PYTHON) benchmarks/gpu.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
