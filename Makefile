# Quickstart: `make demo` and `make test` work on a fresh machine with only Python 3.
# torch is pinned and installed first, so pip never resolves an unpinned torch (and its
# several GB of CUDA packages).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.gradguard-installed
TORCH  := torch==2.13.0

.PHONY: venv demo test lint typecheck unit bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[dev,lightning]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/gradguard run --json reports/demo.json examples/missing_zero_grad.py

lint: $(STAMP)
	$(BIN)/ruff check gradguard tests examples benchmarks docs/make_rules.py
	$(BIN)/ruff format --check gradguard tests examples benchmarks docs/make_rules.py

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP)
	$(BIN)/python -m pytest -q -n 2  # two workers: CI has two cores

test: lint typecheck unit

bench: $(STAMP)
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) reports build *.egg-info
