# Quickstart: `make demo` (set up, then distil MiniLM offline) and `make test` (set up, then the suite).
VENV ?= .venv
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-fast bench clean

setup:
	VENV=$(VENV) bash scripts/setup.sh

# DEMO_SET: overrides for the demo, e.g. "train.time_budget_minutes=null" (all its steps, however
# long); DEMO_RUN: its run name (a run with other settings is another run).
DEMO_SET ?=
DEMO_RUN ?= demo
demo: setup
	$(VENV)/bin/distil train --config configs/demo.yaml --set run.name=$(DEMO_RUN) $(foreach o,$(DEMO_SET),--set $(o))
	$(VENV)/bin/distil eval runs/$(DEMO_RUN)/model --no-probe  # size and speed; the run printed the probe

test: setup
	$(VENV)/bin/python -m pytest

test-fast: setup
	$(VENV)/bin/python -m pytest -m "not slow"

clean:
	rm -rf runs .pytest_cache
