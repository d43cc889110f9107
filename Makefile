# The two commands in the README:
#   make demo   set up .venv, fetch the demo base model, run the quickstart pipeline on it
#   make test   set up .venv with test tools, fetch the demo base model, run the whole test suite
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test test-fast install install-dev demo-model lint clean

install:
	bash scripts/install.sh

install-dev:
	bash scripts/install.sh dev

demo-model:
	$(BIN)/edgetune models fetch-demo

demo: install demo-model
	$(BIN)/edgetune quickstart

test: install-dev demo-model
	$(BIN)/python -m pytest -q

test-fast: install-dev demo-model
	$(BIN)/python -m pytest -q -m "not slow"

lint:
	$(BIN)/ruff check edgetune tests scripts

clean:
	rm -rf $(VENV) runs build *.egg-info .pytest_cache
