# Quick start: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv and install mcpm into it with `pip install -e ".[test]"` on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install bench bench-infllmv2 bench-gpu clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

# The test extra installs libtpu (for the TPU AOT compile tests), which makes JAX look for a TPU
# first; the quick start runs on the CPU unless JAX_PLATFORMS says otherwise.
demo: $(VENV)/.installed
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(VENV)/bin/mcpm demo

# pytest exits 5 when it collects no test; that is not a failure of the suite. The tests run in
# TEST_WORKERS processes (pytest-xdist): most of their time is XLA compiles, one core each.
TEST_WORKERS ?= 2
test: $(VENV)/.installed
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) -m pytest -n $(TEST_WORKERS) tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

bench: export JAX_PLATFORMS ?= cpu
bench: $(VENV)/.installed
	$(PY) experiments/bench_forward.py
	$(PY) experiments/bench_convert.py
	$(PY) experiments/bench_train.py

# about an hour on 2 cores (dense attention at 128K tokens is most of it)
bench-infllmv2: export JAX_PLATFORMS ?= cpu
bench-infllmv2: $(VENV)/.installed
	$(PY) experiments/bench_infllmv2.py

# on a machine with a GPU (and jax[cuda]): about 6 minutes on one H100
bench-gpu: $(VENV)/.installed
	$(PY) experiments/bench_gpu.py

clean:
	rm -rf $(VENV) runs .pytest_cache
