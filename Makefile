# Everything installs into .venv; torch is pinned to the local CPU build by
# constraints.txt so that no CUDA wheels are ever pulled.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
SRC := nnfim tests benchmarks docs

.PHONY: install lint format test demo bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.cfg pyproject.toml constraints.txt | $(PY)
	$(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt -e '.[dev,plot,data]'
	touch $@

install: $(STAMP)

lint: install
	$(PY) -m ruff check $(SRC)
	$(PY) -m ruff format --check $(SRC)
	$(PY) -m mypy nnfim

format: install
	$(PY) -m ruff format $(SRC)
	$(PY) -m ruff check --fix $(SRC)

test: lint
	$(PY) -m pytest

demo: install
	$(PY) -m nnfim.demo --out runs/demo

bench: install
	$(PY) -m benchmarks.bench_core

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache *.egg-info
