# termsys: `make run` serves the product, `make test` runs the whole suite.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: run test install lint format lock clean bench

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip

$(VENV)/.base-installed: requirements/base.txt | $(VENV)/bin/python
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements/base.txt
	touch $@

$(VENV)/.dev-installed: requirements/dev.txt requirements/base.txt $(VENV)/.base-installed
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements/dev.txt
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

install: $(VENV)/.base-installed node_modules/.installed

run: install
	$(PY) manage.py migrate --noinput
	$(PY) manage.py bootstrap_admin
	exec $(PY) manage.py serve --host $(HOST) --port $(PORT)

test: install $(VENV)/.dev-installed
	$(PY) -m pytest $(PYTEST_ARGS)

# termsys side by side with terminado and the raw-PTY floor (bench/README.md); prints figures,
# asserts nothing. Needs ../shared/bench (the shared client); RUNS=N runs.
RUNS ?= 3
bench: install $(VENV)/.dev-installed
	$(PY) bench/peers.py --runs $(RUNS)

lint: $(VENV)/.dev-installed
	$(VENV)/bin/ruff check .

format: $(VENV)/.dev-installed
	$(VENV)/bin/ruff format .

# Re-pin dependencies from pyproject.toml into requirements/ (needs the package registry).
lock:
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet .
	{ echo "# Pinned runtime dependencies (generated from pyproject.toml; regenerate with 'make lock')."; \
	  .lock-venv/bin/pip freeze --exclude termsys; } > requirements/base.txt
	.lock-venv/bin/pip install --quiet '.[dev]'
	{ echo "# Pinned test and lint dependencies on top of base.txt (regenerate with 'make lock')."; \
	  echo "-r base.txt"; comm -13 <(grep -v '^#' requirements/base.txt | sort) <(.lock-venv/bin/pip freeze --exclude termsys | sort); } > requirements/dev.txt
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) node_modules var/static
