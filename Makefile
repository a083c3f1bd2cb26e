# gradsae: `make demo` sets up and runs the demo, `make test` sets up and runs the tests.
# Both build .venv from nothing (pinned through constraints.txt) on first use.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.gradsae-installed
PIP    := $(BIN)/python -m pip install -c constraints.txt

.PHONY: setup test test-gpu build-cuda bench demo clean

$(STAMP): setup.py pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade "pip>=23" setuptools wheel pybind11
	$(PIP) torch==2.13.0 triton==3.7.1
	$(PIP) --no-build-isolation -e ".[test,report,compat]"
	touch $(STAMP)

setup: $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# On a GPU machine: build the CUDA extension (gradsae._C) into the venv, then run the GPU tests.
build-cuda: $(STAMP)
	GRADSAE_BUILD_CUDA=1 $(PIP) --no-build-isolation -e .

test-gpu: $(STAMP)
	$(BIN)/python -m pytest -q -m gpu

bench: $(STAMP)
	$(BIN)/python bench/run.py

demo: $(STAMP)
	$(BIN)/gradsae demo

clean:
	rm -rf $(VENV) build *.egg-info
