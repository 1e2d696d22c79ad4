# agentq — `make run` starts the demo, `make test` runs the whole suite. Both install what they need.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8000

.PHONY: install run test test-chaos lint bench clean redis chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Starts the local Redis if nothing answers on REDIS_URL's port (it keeps nothing on disk).
redis:
	@url="$${REDIS_URL:-redis://127.0.0.1:6379/0}"; \
	redis-cli -u "$$url" ping >/dev/null 2>&1 || \
		redis-server --daemonize yes --bind 127.0.0.1 --save "" --appendonly no \
			--port "$$(echo "$$url" | sed -E 's#^[a-z]+://([^@/]*@)?[^:/]*(:([0-9]+))?.*#\3#' | grep . || echo 6379)"

# Debian's headless Chromium and its driver, for the tests that open the pages in a real browser.
chromium:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
		(apt-get update -q && apt-get install -y -q chromium chromium-driver)

run: install redis
	mkdir -p var
	$(BIN)/agentq db init
	@$(BIN)/agentq demo seed --mock-url http://127.0.0.1:$${AGENTQ_DEMO_UPSTREAM_PORT:-8765}/v1 > var/demo.json
	@echo
	@echo "  agentq is starting at http://127.0.0.1:$(PORT)"
	@echo "  demo API key: $$(cat var/demo-api-key)"
	@echo "  demo agent id: $$($(BIN)/python -c 'import json;print(json.load(open("var/demo.json"))["agent_id"])')"
	@echo "  try the curl session in README.md; Ctrl-C stops everything"
	@echo
	PATH="$(CURDIR)/$(BIN):$$PATH" AGENTQ_WEB_PORT=$(PORT) $(BIN)/honcho -f Procfile.demo start

# The suite in TEST_PROCESSES pytest-xdist processes, each a session of its own (database, Redis database, workers):
# most of a test's time is real processes booting and waiting out leases, which two sessions overlap.
TEST_PROCESSES ?= 2

test: install redis chromium
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -q -n $(TEST_PROCESSES)

test-chaos: install redis
	$(BIN)/pytest -q -m chaos -s

lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

bench: install redis
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) var .pytest_cache .ruff_cache
