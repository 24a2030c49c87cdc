# Everything installs into .venv; torch is pinned to the local CPU build by
# constraints.txt so that no CUDA wheels are ever pulled.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
SRC := nnfim tests benchmarks docs

.PHONY: install lint format test docs demo bench bench-quick bench-docs clean bench-env bench-structured

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): setup.cfg pyproject.toml constraints.txt | $(PY)
	$(PIP) install -q -c constraints.txt torch
	$(PIP) install -q -c constraints.txt -e '.[dev,plot,data,scipy,progress,docs]'
	touch $@

install: $(STAMP)

lint: install
	$(PY) -m ruff check $(SRC)
	$(PY) -m ruff format --check $(SRC)
	$(PY) -m mypy nnfim

format: install
	$(PY) -m ruff format $(SRC)
	$(PY) -m ruff check --fix $(SRC)

test: lint docs
	$(PY) -m pytest

# The documentation site (Sphinx + MyST), warnings as errors.
docs: install
	$(PY) -m sphinx -W --keep-going -q -b html docs docs/_build/html

demo: install
	$(VENV)/bin/nnfim demo --out runs/demo

# Peer libraries for the benchmark suite (python -m benchmarks), in their own environment and
# never a dependency of nnfim: torch (pinned) first, then nnfim, then the peers
# with --no-deps (their torch/torchvision requirements must not reach pip), then
# only the small pure-Python packages that importing them needs (pip then reports
# torchvision as missing: expected, nothing here imports it).
BENCH_VENV ?= .bench-venv
BENCH_PY := $(BENCH_VENV)/bin/python
BENCH_PIP := $(BENCH_PY) -m pip
BENCH_STAMP := $(BENCH_VENV)/.installed
BENCH_PEERS := nngeometry curvlinops-for-pytorch backpack-for-pytorch
BENCH_PEER_NEEDS := einops einconv unfoldNd linear_operator scipy numpy tqdm opt_einsum

$(BENCH_PY):
	$(PYTHON) -m venv $(BENCH_VENV)

$(BENCH_STAMP): setup.cfg pyproject.toml constraints.txt | $(BENCH_PY)
	$(BENCH_PIP) install -q -c constraints.txt torch==2.13.0
	$(BENCH_PIP) install -q -c constraints.txt -e .
	$(BENCH_PIP) install -q --no-deps $(BENCH_PEERS)
	$(BENCH_PIP) install -q -c constraints.txt $(BENCH_PEER_NEEDS)
	$(BENCH_PY) -c "import torch, nngeometry.metrics, curvlinops, backpack.extensions; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

bench-env: $(BENCH_STAMP)

# The suite: every workload for nnfim, the peers, torch.func and the floor, each
# case in a fresh process; writes benchmarks/results/bench.{json,md}.
bench: bench-env
	$(BENCH_PY) -m benchmarks

bench-quick: bench-env
	$(BENCH_PY) -m benchmarks --quick

# The full suite, its table also written into docs/benchmarks.md (run it alone
# on a quiet machine).
bench-docs: bench-env
	$(BENCH_PY) -m benchmarks --docs docs/benchmarks.md

bench-structured: bench-env
	$(BENCH_PY) -m benchmarks.bench_structured

clean:
	rm -rf $(VENV) runs .pytest_cache .mypy_cache .ruff_cache *.egg-info docs/_build
