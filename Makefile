# relayrl: every target installs what it needs (scripts/install.sh is idempotent).
VENV   ?= .venv
CONFIG ?= deploy/examples/arithmetic_smollm2.toml
export VENV
# A locally started Ray instance needs no token authentication; a cluster sets its own mode.
export RAY_AUTH_MODE ?= disabled

VENV_GPU ?= .venv-gpu

.PHONY: install install-gpu train test test-fast test-unit test-gpu gpu-check clean

install:
	bash scripts/install.sh cpu

install-gpu:
	VENV=$(VENV_GPU) bash scripts/install.sh gpu

## Main job on its embedded default config (override: make train CONFIG=... ARGS="learner.lr=1e-6").
train: install
	$(VENV)/bin/relayrl train $(CONFIG) $(ARGS)

## Whole test suite (unit + integration on CPU; GPU tests skip without a GPU).
test: install
	$(VENV)/bin/python -m pytest tests -q -rs --durations=30

## The edit loop: every test not marked slow (unit tests and the quick integration tests), a few minutes.
test-fast: install
	$(VENV)/bin/python -m pytest tests -q -rs -m "not slow" --durations=10

test-unit: install
	$(VENV)/bin/python -m pytest tests/unit -q

## On a CUDA machine: the GPU stack in its own venv, then tests/gpu (skipped without a GPU).
test-gpu: install-gpu
	$(VENV_GPU)/bin/python -m pytest tests/gpu -q -rs

## On a CUDA machine: every GPU check (tests/gpu, a short main-job and LoRA run, engine conformance on CUDA
## kernels) in under 8 minutes, written to one JSON.
gpu-check: install-gpu
	$(VENV_GPU)/bin/python -m tooling.gpu_check --out docs/gpu_check.json

clean:
	rm -rf $(VENV) $(VENV_GPU) runs .pytest_cache
