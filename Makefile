# relayrl: every target installs what it needs (scripts/install.sh is idempotent).
VENV   ?= .venv
CONFIG ?= deploy/examples/arithmetic_smollm2.toml
export VENV
# A locally started Ray instance needs no token authentication; a cluster sets its own mode.
export RAY_AUTH_MODE ?= disabled

.PHONY: install install-gpu train test test-fast test-unit clean

install:
	bash scripts/install.sh cpu

install-gpu:
	bash scripts/install.sh gpu

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

clean:
	rm -rf $(VENV) runs .pytest_cache
