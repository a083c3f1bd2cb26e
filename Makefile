# gradsae: `make demo` sets up and runs the demo, `make test` sets up and runs the tests.
# Both build .venv from nothing (pinned through constraints.txt) on first use: the demo
# installs the package and what the demo needs; the tests add Triton, pytest and the
# libraries whose SAEs and models gradsae accepts (SAELens, sparsify, TransformerLens).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
BASE   := $(VENV)/.gradsae-base
FULL   := $(VENV)/.gradsae-test
PIP    := $(BIN)/python -m pip install -c constraints.txt

.PHONY: setup test test-gpu build-cuda bench demo clean gpu-check

$(BASE): setup.py pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade "pip>=23" setuptools wheel
	$(PIP) torch==2.13.0
	$(PIP) --no-build-isolation -e ".[demo]"
	touch $(BASE)

$(FULL): $(BASE)
	$(PIP) triton==3.7.1 pybind11
	$(PIP) --no-build-isolation -e ".[demo,report,test,compat]"
	touch $(FULL)

setup: $(FULL)

test: $(FULL)
	$(BIN)/python -m pytest -q

# On a GPU machine: build the CUDA extension (gradsae._C) into the venv, then run the GPU tests.
build-cuda: $(FULL)
	GRADSAE_BUILD_CUDA=1 $(PIP) --no-build-isolation -e .

test-gpu: $(FULL)
	$(BIN)/python -m pytest -q -m gpu

bench: $(FULL)
	$(BIN)/python bench/run.py

# One round on a lent GPU machine as it is (its python3 and packages, no network): install into
# the output folder, build gradsae._C for sm_90a/sm_90, the gpu tests, the benchmark; under 8
# minutes, logs and gpu-check.json in $$OUT (else gpu-check-out/). GPU_CHECK_ARGS=--dry-run
# runs the same plumbing on a CPU.
gpu-check:
	$(PYTHON) scripts/gpu_check.py $(GPU_CHECK_ARGS)

demo: $(BASE)
	$(BIN)/gradsae demo

clean:
	rm -rf $(VENV) build *.egg-info
