# All set-up goes through these targets; a fresh machine needs only python3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run lint test test-fast test-slow bench clean

install: $(STAMP)

# The test doubles (the SFAPI emulator) are a distribution of their own, emulator/, outside the wheel.
$(STAMP): pyproject.toml emulator/pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]' -e ./emulator
	$(PY) -c 'import detstream.counting as c; c.compile_kernels()'
	$(PY) -c 'import detstream.sources.simulator as s; s.compile_kernels()'
	touch $(STAMP)

run: install
	$(VENV)/bin/detstream run $(ARGS)

# ruff's rules (pyproject.toml) and the import-linter contracts that declare the layers.
lint: install
	$(VENV)/bin/ruff check detstream flows tasks blocks deployments benchmarks tests emulator
	$(VENV)/bin/lint-imports --no-cache

# Everything but the loops, soaks and namespace faults (make test-slow): about 15 minutes on 2 cores.
test: install
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# Loops, soaks and network-namespace faults (at most 45 minutes); .ci/run runs them after make test.
test-slow: install
	$(PY) -m pytest -m slow $(PYTEST_ARGS)

# The unit tests only (no whole sessions, no browser, no faults), under a minute: three processes
# on two cores, since many of these tests wait on a server (etcd, the SFAPI emulator) or a lease.
test-fast: install
	$(PY) -m pytest -m "unit and not slow" -q -n 3 $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
