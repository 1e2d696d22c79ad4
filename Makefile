# agentq — `make run` starts the demo, `make test` runs the whole suite. Both install what they need.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

# A variable as agentq's own commands read it: given to make, else `.env` in this directory (python-dotenv),
# else the default given; empty counts as not given. A value from the environment is taken as it is
# (`$(value)`); one from make's command line as make hands it to the recipes' commands (its `$$` a `$`).
# Expanded only in recipes, once `install` has made the interpreter; `quoted` makes a value one shell word.
setting = $(or $(if $(filter command line environment%,$(origin $(1))),$(call given,$(1))),$(call in_dotenv,$(1),$(2)))
given = $(if $(filter command line,$(origin $(1))),$($(1)),$(value $(1)))
in_dotenv = $(shell $(BIN)/python -c \
	'import sys, dotenv; print(dotenv.dotenv_values(".env").get(sys.argv[1]) or sys.argv[2])' $(1) $(2))
quoted = '$(subst ','\'',$(1))'
web_port = $(call setting,PORT,8000)
upstream_port = $(call setting,AGENTQ_DEMO_UPSTREAM_PORT,8765)

.PHONY: install run test test-loaded test-chaos lint bench clean redis chromium

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Where PYTHONDONTWRITEBYTECODE is set (as on this project's CI machines) Python writes no bytecode, and every
# `agentq` process compiled agentq's own modules again: about 0.35 s of CPU a command on a slow host. Compiled
# here (at once when nothing changed), they are read, and a module edited since is compiled again as usual.
install: $(STAMP)
	@$(BIN)/python -m compileall -q -j 0 app cli web workers bench

# Starts the local Redis if nothing answers on REDIS_URL's port (it keeps nothing on disk); a REDIS_URL naming
# another host is that host's to serve, and is only said not to answer.
redis: install
	@url=$(call quoted,$(call setting,REDIS_URL,redis://127.0.0.1:6379/0)); \
	redis-cli -u "$$url" ping >/dev/null 2>&1 || \
	case "$$(echo "$$url" | sed -E 's#^[a-z]+://([^@/]*@)?([^:/]*).*#\2#')" in \
		127.0.0.1|localhost|"") redis-server --daemonize yes --bind 127.0.0.1 --save "" --appendonly no \
			--port "$$(echo "$$url" | sed -E 's#^[a-z]+://([^@/]*@)?[^:/]*(:([0-9]+))?.*#\3#' | grep . || echo 6379)";; \
		*) echo "The Redis REDIS_URL names does not answer; make starts only a local one" >&2;; \
	esac

# Debian's headless Chromium and its driver, for the tests that open the pages in a real browser.
chromium:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || \
		(apt-get update -q && apt-get install -y -q chromium chromium-driver)

# The ports, REDIS_URL and the demo worker's grace are read as agentq reads its settings (`setting`) and given to
# honcho, which reads no `.env` of its own (`-e /dev/null`): its values would override the environment's, where
# every agentq command lets the environment win, and the ports printed would not be the ones served.
run: install redis
	mkdir -p var && chmod 700 var  # the database, and the demo administrator's key (var/demo.json too)
	$(BIN)/agentq db init
	@$(BIN)/agentq demo seed --mock-url $(call quoted,http://127.0.0.1:$(upstream_port)/v1) > var/demo.json
	@echo
	@echo "  agentq is starting at http://127.0.0.1:"$(call quoted,$(web_port))
	@echo "  demo API key: $$(cat var/demo-api-key)"
	@echo "  demo agent id: $$($(BIN)/python -c 'import json;print(json.load(open("var/demo.json"))["agent_id"])')"
	@echo "  try the curl session in README.md; Ctrl-C stops everything"
	@echo
	PATH="$(CURDIR)/$(BIN):$$PATH" AGENTQ_WEB_PORT=$(call quoted,$(web_port)) \
		AGENTQ_DEMO_UPSTREAM_PORT=$(call quoted,$(upstream_port)) \
		AGENTQ_SHUTDOWN_GRACE_SECONDS=$(call quoted,$(call setting,AGENTQ_SHUTDOWN_GRACE_SECONDS,2)) \
		$(BIN)/honcho -e /dev/null -f Procfile.demo start

# The suite in TEST_PROCESSES pytest-xdist processes, each a session of its own (database, Redis database, workers):
# most of a test's time is real processes booting and waiting out leases, which three sessions overlap on two cores.
TEST_PROCESSES ?= 3

# The type check runs beside the suite, whose processes mostly wait on real services, instead of before it: on a
# clean checkout (no mypy cache) it is half a minute of one core. Its report follows the suite's; either failing
# fails the target.
test: install redis chromium
	$(BIN)/ruff check .
	@types=$$(mktemp); $(BIN)/mypy > "$$types" 2>&1 & checker=$$!; \
	$(BIN)/pytest -q -n $(TEST_PROCESSES); suite=$$?; \
	wait $$checker; typed=$$?; echo "mypy: $$(tail -n 1 "$$types")"; \
	test $$typed -eq 0 || cat "$$types"; rm -f "$$types"; \
	test $$suite -eq 0 -a $$typed -eq 0

# The suite as a slow host runs it: BUSY_LOOPS processes spinning beside it (one a core by default) take their
# share of the cores, so a test that passes only when the machine is fast fails here rather than on CI's slowest.
BUSY_LOOPS ?= $(shell nproc)

test-loaded: install redis chromium
	@pids=""; trap 'kill $$pids 2>/dev/null' EXIT; trap 'exit 130' INT TERM; \
	for i in $$(seq $(BUSY_LOOPS)); do python3 -c 'while True: pass' & pids="$$pids $$!"; done; \
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
