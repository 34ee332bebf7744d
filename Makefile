# Quick start: `make demo` (the main job) and `make test` (the test suite).
# Both create .venv and install mcpm into it with `pip install -e ".[test]"` on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test install bench clean

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

# pytest exits 5 when it collects no test; that is not a failure of the suite
test: $(VENV)/.installed
	JAX_PLATFORMS=$${JAX_PLATFORMS:-cpu} $(PY) -m pytest tests; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests collected"; exit 0; fi; exit $$rc

bench: export JAX_PLATFORMS ?= cpu
bench: $(VENV)/.installed
	$(PY) experiments/bench_forward.py
	$(PY) experiments/bench_convert.py

clean:
	rm -rf $(VENV) runs .pytest_cache
