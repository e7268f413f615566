# The two commands a fresh machine needs: `make dev` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: dev test test-fast typecheck lint format bench clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@rm -f $(VENV)/.installed-* && touch $@

dev: $(STAMP)  ## Start Redis (embedded), web, both workers and the sweeper
	$(BIN)/sluice dev $(ARGS)

test: $(STAMP)  ## Lint, then the whole suite against real Redis, DB, workers and HTTP
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest $(PYTEST_ARGS)

test-fast: $(STAMP)  ## Only the tests that need no database, Redis or processes
	$(BIN)/pytest -m unit -q $(PYTEST_ARGS)

typecheck: $(STAMP)  ## mypy, strict on app/ and workers/ (settings in pyproject.toml)
	$(BIN)/mypy

lint: $(STAMP)
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(STAMP)  ## Benchmarks against the real stack; print tables
	$(BIN)/python -m bench $(ARGS)

clean:
	rm -rf $(VENV) var .pytest_cache
