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

# The tests marked `precision` with the policy flipped (EDGETUNE_CPU_BF16=slow on a CPU with fast
# bf16, =fast on one without), then the whole suite with the policy this machine chooses, so both
# numeric paths are exercised on any machine. The suite's slowest tests are listed last.
# One pytest worker per core (pytest-xdist). In the whole suite a test module stays on one worker so
# its module-scoped fixtures on the demo model are built once. PARALLEL= runs serially.
PARALLEL ?= -n auto
BY_MODULE = $(if $(PARALLEL),--dist loadfile)
OTHER_PATH = $(shell $(BIN)/python -c "from edgetune.precision import cpu_bf16; print('slow' if cpu_bf16().fast_train else 'fast')" 2>/dev/null || echo slow)

test: install-dev demo-model
	EDGETUNE_CPU_BF16=$(OTHER_PATH) $(BIN)/python -m pytest -q -m precision $(PARALLEL) $(BY_MODULE)
	$(BIN)/python -m pytest -q --durations=15 $(PARALLEL) $(BY_MODULE)

# Fast tests need nothing beyond the repository (tiny models built in seconds, the committed
# SmolLM2 tokenizer), so no demo model is fetched; the tests marked `slow` use it.
test-fast: install-dev
	$(BIN)/python -m pytest -q -m "not slow" --durations=10 $(PARALLEL)

lint:
	$(BIN)/ruff check edgetune tests scripts

clean:
	rm -rf $(VENV) runs build *.egg-info .pytest_cache
