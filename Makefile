# trading-ledger developer tasks.
#
#   make install   venv + editable install (only when pyproject.toml changed) + redis/postgres
#   make test      run the test suite against real local servers (PYTEST_ARGS=... to pass options)
#   make test-fuzz the fuzz and model-based tests, long (FUZZ_EXAMPLES=2000 by default)
#   make test-slow the slow tests `make test` skips (export of 1,000,000 events in bounded memory)
#   make demo      run `ledger demo`
#   make lint      ruff + mypy
#   make bench     run the benchmark suite (benchmarks/, full sizes, each scenario 3 runs, medians;
#                  writes benchmarks/results/latest.json)
#   make bench-quick  the same, small sizes, under a minute (writes benchmarks/results/latest-quick.json)
#   make clean     remove the venv, private servers' data and caches

SHELL := /bin/bash
.DEFAULT_GOAL := test

PYTHON ?= python3
VENV := .venv
VENV_PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.bench-installed
PYTEST_ARGS ?=

# sudo only when not already root (CI runs as root and may not have sudo at all).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT_GET := $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get

.PHONY: install system-deps test test-fuzz test-slow demo lint bench bench-quick clean

install: system-deps $(STAMP)

# Debian packages for the real servers the tests and `ledger serve` use.
# redis-server brings redis-tools (redis-cli); postgresql brings initdb/pg_ctl
# under /usr/lib/postgresql/<version>/bin.
system-deps:
	@missing=""; \
	command -v redis-server >/dev/null 2>&1 || missing="$$missing redis-server"; \
	command -v redis-cli >/dev/null 2>&1 || missing="$$missing redis-tools"; \
	if ! command -v initdb >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then \
		missing="$$missing postgresql"; \
	fi; \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:$$missing"; \
		$(APT_GET) update -q && \
		$(APT_GET) install -y -q --no-install-recommends $$missing; \
	fi

$(VENV_PY):
	@$(PYTHON) -m venv $(VENV) || { \
		echo "python venv module missing; installing python3-venv"; \
		rm -rf $(VENV); \
		$(APT_GET) update -q && $(APT_GET) install -y -q --no-install-recommends python3-venv && \
		$(PYTHON) -m venv $(VENV); }

# Reinstall only when pyproject.toml is newer than the stamp.
$(STAMP): pyproject.toml | $(VENV_PY)
	$(VENV_PY) -m pip install -q -e '.[dev]'
	@touch $@

# pytest exit status 5 means "no tests collected": not a failure here.
test: install
	@rc=0; $(VENV_PY) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest: no tests collected (treated as success)"; exit 0; fi; \
	exit $$rc

# The fuzz and model-based tests run bounded in `make test`; here with many more examples, shrunk.
FUZZ_EXAMPLES ?= 2000
test-fuzz: install
	LEDGER_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(VENV_PY) -m pytest -m fuzz tests/integration/test_fuzz.py tests/integration/test_model.py $(PYTEST_ARGS)

# The slow tests (marked `slow`, skipped unless LEDGER_SLOW=1).
test-slow: install
	LEDGER_SLOW=1 $(VENV_PY) -m pytest -m slow $(PYTEST_ARGS)

demo: install
	$(VENV)/bin/ledger demo

lint: install $(BENCH_STAMP)
	$(VENV)/bin/ruff check ledger projections consumers tests benchmarks
	$(VENV)/bin/mypy ledger projections consumers benchmarks

# The benchmarks' own dependencies (the optional group `bench`: rich, eventsourcing, py-spy).
$(BENCH_STAMP): pyproject.toml | $(STAMP)
	$(VENV_PY) -m pip install -q -e '.[dev,bench]'
	@touch $@

# Not tests: nothing here runs in `make test`; each scenario starts its own servers.
bench: install $(BENCH_STAMP)
	$(VENV_PY) -m benchmarks --runs 3 $(BENCH_ARGS)

bench-quick: install $(BENCH_STAMP)
	$(VENV_PY) -m benchmarks --quick $(BENCH_ARGS)

clean:
	rm -rf $(VENV) .ledger .pytest_cache .mypy_cache .ruff_cache .hypothesis build dist *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
