# pinguin-daemon: every target works on a fresh machine with make and an internet connection.
# PYTHON only installs uv (any Python 3.8+, e.g. macOS's stock 3.9; none at all also works);
# uv then finds a Python >= 3.11 on the machine or installs one of its own for .venv.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
CONFIG ?= config/default.toml
# Extra pytest arguments, e.g. make test PYTEST_ARGS="-k engine -x"
PYTEST_ARGS ?=

# Service targets: SYSTEM=1 for a LaunchDaemon at boot (macOS, sudo); SYSTEMD=1 on Linux.
SERVICE_FLAGS = $(if $(SYSTEM),--system) $(if $(SYSTEMD),--systemd)
# The account a LaunchDaemon runs as; by default the one that ran sudo (never root).
SERVICE_USER ?=

.PHONY: setup run test lint bench bench-engine gpu-check clean install-service uninstall-service service-status logs

# uv installs the exact versions of uv.lock; uv itself lives in .tools/, installed from PyPI.
UV := .tools/bin/uv
# The uv release the standalone installer fetches when no Python can pip-install one (pip gets
# the newest of "uv>=0.9,<1"); both understand the committed uv.lock.
UV_VERSION := 0.13.9
# MLX's backend on Linux: cpu, cuda12 or cuda13 (make setup GPU=cuda13). Detected: an NVIDIA
# driver (nvidia-smi) picks the CUDA major it supports, otherwise cpu. No effect on macOS (Metal).
GPU ?= $(shell v=$$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: \([0-9]*\).*/\1/p'); \
	if [ -z "$$v" ]; then echo cpu; elif [ "$$v" -ge 13 ]; then echo cuda13; else echo cuda12; fi)
EXTRAS := --extra test --extra $(GPU)

# Any Python 3.8+ with venv can pip-install uv (the version of the Python that runs the daemon
# does not matter here). Without one (no python3, or Debian's without python3-venv), uv's own
# installer puts the pinned release in .tools/bin.
$(UV):
	@rm -rf .tools
	@if $(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 8))' >/dev/null 2>&1 \
	    && $(PYTHON) -m venv .tools >/dev/null 2>&1; then \
	  echo "installing uv into .tools with $$($(PYTHON) -c 'import sys; print(sys.executable, sys.version.split()[0])')"; \
	  .tools/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip && \
	  .tools/bin/python -m pip install --quiet --disable-pip-version-check "uv>=0.9,<1"; \
	else \
	  echo "no Python 3.8+ with venv as '$(PYTHON)': installing uv $(UV_VERSION) with its standalone installer"; \
	  rm -rf .tools; \
	  curl -LsSf https://astral.sh/uv/$(UV_VERSION)/install.sh \
	    | env UV_UNMANAGED_INSTALL="$(CURDIR)/.tools/bin" sh; \
	fi
	@test -x $(UV) || { echo "make setup: could not install uv into .tools" >&2; exit 1; }

# The venv is (re)synced when pyproject.toml or uv.lock changes, or for another GPU= backend.
# No --python: uv takes pyproject's requires-python (>= 3.11) and uses a matching Python of this
# machine, or downloads one of its managed builds (macOS's stock python3 is 3.9). UV_PYTHON=3.12
# picks one.
$(BIN)/.installed-$(GPU): pyproject.toml uv.lock | $(UV)
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --frozen $(EXTRAS)
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
# clients, writes bench-results/latency.{json,png}. On a Mac: make bench BENCH_MODEL=kyutai/stt-1b-en_fr-candle
BENCH_MODEL ?= synthetic
BENCH_ARGS ?= --max-sessions 8 --duration 20
bench: setup
	UV_PROJECT_ENVIRONMENT=$(VENV) $(UV) sync --frozen --inexact $(EXTRAS) --extra bench
	$(BIN)/python -m pinguin_daemon.bench.latency --model $(BENCH_MODEL) $(BENCH_ARGS)

# Fills launchd/ templates with this checkout's paths, validates, pre-downloads the model, loads it.
# Under sudo (SYSTEM=1) the checkout is not set up again: files that root writes into .venv and
# .tools would stop the owner's own `make setup` later.
install-service: $(if $(SUDO_USER),,setup)
	@test -x $(BIN)/pinguin-daemon || { echo "run \`make setup\` first, without sudo" >&2; exit 1; }
	$(BIN)/pinguin-daemon service install --config $(CONFIG) $(SERVICE_FLAGS) $(if $(SERVICE_USER),--user $(SERVICE_USER))

uninstall-service: $(if $(SUDO_USER),,setup)
	$(BIN)/pinguin-daemon service uninstall $(SERVICE_FLAGS)

service-status: $(if $(SUDO_USER),,setup)
	$(BIN)/pinguin-daemon service status --config $(CONFIG) $(SERVICE_FLAGS)

# macOS: the daemon's own log (rotated at 10 MB, 5 kept) and launchd's file for start-up errors
# and crashes; -F follows daemon.log across a rotation.
LOG_DIR = $${HOME}/Library/Logs/pinguin-daemon
logs:
	@if [ "$$(uname)" = Darwin ]; then tail -n 100 -F "$(LOG_DIR)/daemon.log" "$(LOG_DIR)/launchd.log"; \
	else journalctl --user -u pinguin-daemon.service -n 100 -f; fi

clean:
	rm -rf $(VENV) .tools .cache .pytest_cache .mypy_cache .ruff_cache bench-results
