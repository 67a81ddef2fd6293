# herd: `make run` serves the proxy on proxy.toml; `make test` runs the linters (ruff, mypy)
# and the test suite; `make demo` shows herd at work, offline. Each sets up what it needs
# first (a virtualenv in .venv with every documented command's extras; redis-server for the
# tests).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
CONFIG ?= proxy.toml

.PHONY: run demo test lint bench eval redis-server clean

$(VENV)/.run: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[bench,eval]'
	touch $@

$(VENV)/.test: pyproject.toml $(VENV)/.run
	$(BIN)/pip install -q -e '.[test]'
	touch $@

run: $(VENV)/.run
	$(BIN)/herd serve --config $(CONFIG)

demo: $(VENV)/.run
	$(BIN)/herd demo

redis-server:
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (the tests start their own on free ports)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq redis-server; fi; }

lint: $(VENV)/.test
	$(BIN)/ruff check .
	$(BIN)/mypy

test: lint redis-server
	$(BIN)/python -m pytest -q

bench: $(VENV)/.run
	$(BIN)/herd bench

eval: $(VENV)/.run
	$(BIN)/herd eval

clean:
	rm -rf $(VENV) benchmarks/out
