# The two contract commands: `make serve` and `make test`. Both set up .venv themselves.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
# Where a local wheel of the pinned torch lies, pip should look there first.
export PIP_FIND_LINKS ?= $(wildcard /opt/wheels)

HOST ?= 127.0.0.1
PORT ?= 50051
# The Prometheus metrics port (-1: none), e.g. `make serve METRICS_PORT=9401` when 9400 is taken;
# LSTM_SERVE_METRICS_PORT in the environment still applies.
METRICS_PORT ?= $(or $(LSTM_SERVE_METRICS_PORT),9400)

# Triton's Python client pins its own protobuf: it gets a venv of its own, for the tests that
# drive the Open Inference Protocol with it.
TRITON_VENV ?= .venv-triton

.PHONY: serve test lint typecheck unit proto proto-check bench clean triton-client

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	touch $@

# Serving needs no torch: the runtime dependencies only.
$(VENV)/.serve: $(VENV)/.created pyproject.toml
	$(PIP) install -q -e .
	touch $@

$(VENV)/.dev: $(VENV)/.created pyproject.toml
	$(PIP) install -q -e '.[train,dev]'
	touch $@ $(VENV)/.serve

serve: $(VENV)/.serve
	$(VENV)/bin/lstm-serve serve --host $(HOST) --port $(PORT) --metrics-port $(METRICS_PORT)

$(TRITON_VENV)/.ready: tests/triton/requirements.txt
	$(PYTHON) -m venv $(TRITON_VENV)
	$(TRITON_VENV)/bin/python -m pip install -q --disable-pip-version-check -r tests/triton/requirements.txt
	touch $@

triton-client: $(TRITON_VENV)/.ready

test: $(VENV)/.dev $(TRITON_VENV)/.ready lint typecheck proto-check unit

lint: $(VENV)/.dev
	$(VENV)/bin/ruff check service tests scripts
	$(VENV)/bin/ruff format --check service tests scripts

typecheck: $(VENV)/.dev
	$(VENV)/bin/mypy

proto: $(VENV)/.dev
	$(PY) -m lstm_serve.server.gen_pb

proto-check: $(VENV)/.dev
	$(PY) -m lstm_serve.server.gen_pb --check

unit: $(VENV)/.dev
	$(VENV)/bin/pytest -q -ra

bench: $(VENV)/.dev
	$(VENV)/bin/lstm-serve bench --out docs/bench

clean:
	rm -rf $(VENV) $(TRITON_VENV) .mypy_cache .ruff_cache .pytest_cache
