# pinguin-daemon: every target works on a fresh machine with Python 3.11+ and make.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config/default.toml
# Extra pytest arguments, e.g. make test PYTEST_ARGS="-k engine -x"
PYTEST_ARGS ?=

# Service targets: SYSTEM=1 for a LaunchDaemon at boot (macOS, sudo); SYSTEMD=1 on Linux.
SERVICE_FLAGS = $(if $(SYSTEM),--system) $(if $(SYSTEMD),--systemd)

.PHONY: setup run test lint bench bench-engine gpu-check clean install-service uninstall-service service-status logs

# uv installs the exact versions of uv.lock; uv itself lives in .tools/, installed from PyPI.
UV := .tools/bin/uv
# MLX's backend on Linux: cpu, cuda12 or cuda13 (make setup GPU=cuda13). Detected: an NVIDIA
# driver (nvidia-smi) picks the CUDA major it supports, otherwise cpu. No effect on macOS (Metal).
GPU ?= $(shell v=$$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: \([0-9]*\).*/\1/p'); \
	if [ -z "$$v" ]; then echo cpu; elif [ "$$v" -ge 13 ]; then echo cuda13; else echo cuda12; fi)
EXTRAS := --extra test --extra $(GPU)

$(UV):
	$(PYTHON) -m venv .tools
	.tools/bin/pip install --quiet "uv>=0.9,<1"

# The venv is (re)synced when pyproject.toml or uv.lock changes, or for another GPU= backend.
$(BIN)/.installed-$(GPU): pyproject.toml uv.lock | $(UV)
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --frozen --python $(PYTHON) $(EXTRAS)
	rm -f $(BIN)/.installed-*
	touch $@

setup: $(BIN)/.installed-$(GPU)

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

# For an operator on an NVIDIA (make setup GPU=cuda13) or Apple machine: engine equality with
# LmGen (f32), neighbour invariance (bf16), step times against concurrent streams at the 1B shape.
GPU_CHECK_ARGS ?=
gpu-check: setup
	$(BIN)/python -m pinguin_daemon.bench.gpu_check --out bench-results/gpu.json $(GPU_CHECK_ARGS)

# The latency harness: starts the daemon (batched, then the sequential baseline), ramps real-time
# clients, writes bench-results/latency.{json,png}. On a Mac: make bench BENCH_MODEL=kyutai/stt-1b-en_fr-mlx
BENCH_MODEL ?= synthetic
# auto: the batched MLX Mimi on a GPU, rustymimi on a CPU-only MLX; or mlx / rustymimi.
BENCH_ENCODER ?= auto
BENCH_ARGS ?= --max-sessions 8 --duration 20
bench: setup
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --frozen --inexact --python $(PYTHON) $(EXTRAS) --extra bench
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
	rm -rf $(VENV) .tools .cache .pytest_cache .mypy_cache .ruff_cache bench-results
