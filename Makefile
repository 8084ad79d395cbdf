# All set-up goes through these targets; a fresh machine needs only python3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install run test test-fast bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -c 'import detstream.counting as c; c.compile_kernels()'
	touch $(STAMP)

run: install
	$(VENV)/bin/detstream run $(ARGS)

test: install
	$(PY) -m pytest $(PYTEST_ARGS)

# The unit tests only (no whole sessions, no browser, no faults), under a minute: three processes
# on two cores, since many of these tests wait on a server (etcd, the SFAPI emulator) or a lease.
test-fast: install
	$(PY) -m pytest -m unit -q -n 3 $(PYTEST_ARGS)

bench: install
	$(PY) benchmarks/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info
