# make test / make demo create or update .venv and do all the set-up (only PyPI needs to be reachable).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PREPARE_STAMP := $(VENV)/.installed-prepare
export HF_HUB_OFFLINE ?= 1
export WANDB_MODE ?= offline

.PHONY: venv test demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev,demo]"
	touch $(STAMP)

venv: $(STAMP)

# The tests of data/prepare.py build VTAB-1K tasks from mocked TFDS, so `make test` also installs the
# [prepare] extra (tensorflow-cpu, tensorflow-datasets: about 25 s from PyPI); they skip without it.
$(PREPARE_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[dev,prepare]"
	touch $(PREPARE_STAMP)

test: $(PREPARE_STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m petl_lightning.demo

bench: $(STAMP)
	$(PY) benchmarks/benchmark.py

clean:
	rm -rf runs demo_data lightning_logs .pytest_cache
