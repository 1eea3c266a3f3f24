# Two commands on a fresh machine: `make demo` and `make test`. Each creates the virtual
# environment in .venv/ and installs the project into it first (once; again when the
# packaging files change).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.modloc-installed
EXTRAS := train,export,serve,dev
# The CPU build of PyTorch, installed explicitly first: left to the resolver, an unpinned
# torch would pull a multi-GB CUDA build.
TORCH := torch==2.13.0

.PHONY: demo test install lint mutation clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml CMakeLists.txt $(wildcard native/*) $(wildcard proto/*/*.proto) $(wildcard proto/*/*/*.proto)
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e '.[$(EXTRAS)]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/modloc demo --out runs/demo

test: lint
	$(BIN)/python -m pytest -q

# Mutation testing of the critical modules (benchmarks/mutation.py; about 2 hours on 2 cores;
# not part of `make test`). It edits the sources in place one mutant at a time: run it on a
# clean tree, alone.
mutation: $(STAMP)
	$(BIN)/python benchmarks/mutation.py --label current

lint: $(STAMP)
	$(BIN)/ruff check modloc engine training export benchmarks tests

clean:
	rm -rf build runs .pytest_cache
