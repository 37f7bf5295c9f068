# Verbs for a newcomer. `make install` first; it installs the CPU build of torch before the
# package so that pip's `torch>=2.0` requirement is already satisfied (a bare `torch` would
# pull a multi-GB CUDA build).
PYTHON ?= python
PIP ?= $(PYTHON) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: help install test test-all docs lint format demo reproduce bench clean

help:
	@echo "make install   install torch==$(TORCH_VERSION), then pyro-mpt in editable mode with test, docs, plots extras"
	@echo "make test      run the fast test suite (slow tests deselected)"
	@echo "make test-all  run every test, slow ones included"
	@echo "make docs      build the HTML docs into docs/_build/html (warnings are errors)"
	@echo "make lint      ruff check and ruff format --check"
	@echo "make format    ruff format and ruff check --fix"
	@echo "make demo      train PPCA with MaskedELBO and compare MPT with the exact LML"
	@echo "make reproduce the paper's experiments at quick sizes into results/"
	@echo "make bench     run benchmarks/bench_ppca_stratified.py"
	@echo "make clean     remove build outputs and caches"

install:
	$(PIP) install torch==$(TORCH_VERSION)
	$(PIP) install -e ".[test,docs,plots,experiments]"

test:
	$(PYTHON) -m pytest -q

test-all:
	$(PYTHON) -m pytest -q -m ""

docs:
	sphinx-build -n -W --keep-going -b html docs docs/_build/html

lint:
	ruff check .
	ruff format --check .

format:
	ruff format .
	ruff check --fix .

demo:
	pyro-mpt demo

reproduce:
	pyro-mpt reproduce --quick --output results

bench:
	$(PYTHON) benchmarks/bench_ppca_stratified.py

clean:
	rm -rf build dist *.egg-info docs/_build .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
