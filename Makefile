# Two commands do all setup: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_CPU := torch==2.13.0

.PHONY: demo test test-fast install bench-fp clean

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

test: $(STAMP)
	$(PY) -m pytest tests -q

test-fast: $(STAMP)
	$(PY) -m pytest tests -q -m "not slow"

bench-fp: $(STAMP)
	$(PY) bench/fp_reference.py

clean:
	rm -rf runs mlruns mlartifacts mlflow.db
