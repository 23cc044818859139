# Two entry points from a fresh clone: `make demo` and `make test`.
# Each creates or reuses .venv in the repo root and installs what it needs.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# Persistent JAX compilation cache: repeated runs compile less.
export JAX_COMPILATION_CACHE_DIR ?= $(CURDIR)/.cache/jax
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS ?= 0.5

.PHONY: demo sweep test test-all clean

$(VENV)/.installed-%: setup.py constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[$*]'
	touch $@

demo: $(VENV)/.installed-demo
	$(PY) -m coma_jax.demo

# The CoMa effect at laptop scale: 5 arms x 3 seeds on the demo data (configs/sweeps/coma_effect.py).
sweep: $(VENV)/.installed-demo
	$(PY) -m coma_jax.sweep --sweep configs/sweeps/coma_effect.py --workdir runs/coma_effect

test: $(VENV)/.installed-test
	$(PY) -m pytest -q -m "not slow" --durations=10

test-all: $(VENV)/.installed-test
	$(PY) -m pytest -q --durations=10

clean:
	rm -rf .cache build *.egg-info
