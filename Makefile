# pinguin-daemon: every target works on a fresh machine with Python 3.11+ and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config/default.toml
# Extra pytest arguments, e.g. make test PYTEST_ARGS="-k engine -x"
PYTEST_ARGS ?=

# Service targets: SYSTEM=1 for a LaunchDaemon at boot (macOS, sudo); SYSTEMD=1 on Linux.
SERVICE_FLAGS = $(if $(SYSTEM),--system) $(if $(SYSTEMD),--systemd)

.PHONY: setup run test lint bench bench-engine clean install-service uninstall-service service-status logs

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

# Engine micro-benchmark: batched engine vs one LmGen per stream, then encode + LM per tick with
# each encoder. On a GPU: make bench-engine ENGINE_ARGS="--shapes 1b --streams 1,64,256,1024"
ENGINE_ARGS ?=
bench-engine: setup
	$(BIN)/python -m pinguin_daemon.bench.engine_bench --out bench-results/engine.json $(ENGINE_ARGS)

# The latency harness: starts the daemon (batched, then the sequential baseline), ramps real-time
# clients, writes bench-results/latency.{json,png}. On a Mac: make bench BENCH_MODEL=kyutai/stt-1b-en_fr-mlx
BENCH_MODEL ?= synthetic
# auto: the batched MLX Mimi on a GPU, rustymimi on a CPU-only MLX; or mlx / rustymimi.
BENCH_ENCODER ?= auto
BENCH_ARGS ?= --max-sessions 8 --duration 20
bench: setup
	$(BIN)/pip install --quiet -e ".[test,bench]"
	$(BIN)/python -m pinguin_daemon.bench.latency --model $(BENCH_MODEL) --encoder $(BENCH_ENCODER) $(BENCH_ARGS)

# Fills launchd/ templates with this checkout's paths, validates, pre-downloads the model, loads it.
install-service: setup
	$(BIN)/pinguin-daemon service install --config $(CONFIG) $(SERVICE_FLAGS)

uninstall-service: setup
	$(BIN)/pinguin-daemon service uninstall $(SERVICE_FLAGS)

service-status: setup
	$(BIN)/pinguin-daemon service status --config $(CONFIG) $(SERVICE_FLAGS)

logs:
	@if [ "$$(uname)" = Darwin ]; then tail -n 100 -f "$$HOME/Library/Logs/pinguin-daemon/daemon.log"; \
	else journalctl --user -u pinguin-daemon.service -n 100 -f; fi

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache bench-results
