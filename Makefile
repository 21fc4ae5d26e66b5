# Quickstart: `make demo` (set up, then distil MiniLM offline) and `make test` (set up, then the suite).
VENV ?= .venv
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast bench clean

setup:
	VENV=$(VENV) bash scripts/setup.sh

demo: setup
	$(VENV)/bin/distil train --config configs/demo.yaml
	$(VENV)/bin/distil eval runs/demo/model --no-probe  # size and speed; the run printed the probe

test: setup
	$(VENV)/bin/python -m pytest

test-fast: setup
	$(VENV)/bin/python -m pytest -m "not slow"

clean:
	rm -rf runs .pytest_cache
