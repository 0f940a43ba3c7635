# One place for the commands people and CI run. `make run` and `make test` work on a fresh
# machine with Python 3.11+ and PyPI: every install step is here or in scripts/.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
SERVER_VENV := .fhir-server-venv

.PHONY: setup spark bench-spark run test lint typecheck unit bench fixtures clean

$(BIN)/cds: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@

$(SERVER_VENV)/bin/uvicorn: scripts/install-fhir-server
	bash scripts/install-fhir-server $(SERVER_VENV)
	touch $@

# The screening page's tests: a real OAuth server (npm oidc-provider, pinned by package-lock.json)
tests/smart_as/node_modules/.package-lock.json: tests/smart_as/package-lock.json
	cd tests/smart_as && npm ci --no-audit --no-fund --silent
	touch $@

setup: $(BIN)/cds $(SERVER_VENV)/bin/uvicorn tests/smart_as/node_modules/.package-lock.json

# The `spark` extra (~450 MB: PySpark and its jars) only where it is used: the Spark sweep's
# test (in `make test`) and benchmark; a Java runtime too if the machine has none.
$(VENV)/.spark-extra: pyproject.toml scripts/install-spark $(BIN)/cds
	bash scripts/install-spark $(VENV)
	touch $@

## spark: PySpark into .venv (and Java 17 if missing), for `cds sweep --engine spark`
spark: $(VENV)/.spark-extra

## run: start a local FHIR server loaded with fhir_fixtures/, the CDS service, and an example call
run: setup
	bash scripts/demo

lint: $(BIN)/cds
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: $(BIN)/cds
	$(BIN)/mypy

unit: $(BIN)/cds
	$(BIN)/python -m pytest -m "not integration"

## test: lint, type-check and the whole suite, integration tests against a real FHIR server included
test: setup spark lint typecheck
	$(BIN)/python -m pytest

bench: setup
	$(BIN)/python bench/bench_evaluate.py
	$(BIN)/python bench/bench_fetch.py
	$(BIN)/python bench/bench_hooks.py
	$(BIN)/python bench/bench_sweep.py

bench-spark: setup spark
	$(BIN)/python bench/bench_spark.py

fixtures: $(BIN)/cds
	$(BIN)/python scripts/build_fixtures.py

clean:
	rm -rf $(VENV) $(SERVER_VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info \
		tests/smart_as/node_modules test-artifacts
