# Two commands matter: `make demo` (offline end-to-end run) and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast bench dag clean-venv

install: $(STAMP)

# Reinstall only when requirements or packaging change.
$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: install
	$(BIN)/python -m braintumor.demo

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# The benchmarks behind BENCHMARKS.md (minutes; the shared datasets must be beside the repo).
bench: install
	$(BIN)/python benchmarks/bench_preprocess.py
	$(BIN)/python benchmarks/bench_dedup.py
	$(BIN)/python benchmarks/dedup_recall.py
	$(BIN)/python benchmarks/bench_input_pipeline.py

dag: install
	$(BIN)/dvc dag

clean-venv:
	rm -rf $(VENV)
