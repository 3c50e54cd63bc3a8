# pinguin-daemon: every target works on a fresh machine with Python 3.11+ and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config/default.toml
# Extra pytest arguments, e.g. make test PYTEST_ARGS="-k engine -x"
PYTEST_ARGS ?=

.PHONY: setup run test lint bench bench-engine clean

# The venv is (re)built when pyproject.toml changes.
$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[test]"
	touch $@

setup: $(BIN)/.installed

run: setup
	$(BIN)/pinguin-daemon serve --config $(CONFIG)

test: setup
	$(BIN)/pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check pinguin_daemon tests
	$(BIN)/mypy pinguin_daemon

# Engine micro-benchmark (issue 3): batched engine vs one LmGen per stream.
bench-engine: setup
	$(BIN)/python -m pinguin_daemon.bench.engine_bench --out bench-results/engine.json

# The full latency harness (daemon + real clients) lands with issue 7; until then `make bench`
# runs the engine benchmark, which is the part that exists.
bench: bench-engine

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache bench-results
