# Two commands do all setup: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_CPU := torch==2.13.0
CHROMIUM := /usr/bin/chromium

.PHONY: demo test test-fast lint chromium install bench-fp clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Torch first, pinned to the CPU build, and only when the venv has none: an unpinned
# torch would pull a multi-GB CUDA build. GPU users install their CUDA torch first (README).
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH_CPU)
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/plmq run configs/demo.yaml

# Lint (ruff; import-linter: the import layers in pyproject.toml), then every test.
test: lint chromium
	$(PY) -m pytest tests -q

test-fast: lint
	$(PY) -m pytest tests -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports --no-cache

# tests/system/test_mlflow_ui.py renders the MLflow UI in Debian's chromium; tests install nothing,
# so it is installed here when missing (root with apt-get, as in CI); elsewhere that test skips.
chromium:
	@if [ ! -x $(CHROMIUM) ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium for the MLflow UI test"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else \
	    echo "note: $(CHROMIUM) is missing and installing it needs root and apt-get: the MLflow UI test will skip"; \
	  fi; \
	fi

bench-fp: $(STAMP)
	$(PY) bench/fp_reference.py

clean:
	rm -rf runs mlruns mlartifacts mlflow.db
