# Windflow: two commands on a fresh machine -> `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv demo test lint typecheck protos protos-check compose-lint clean

venv: $(STAMP)

$(STAMP): requirements.lock requirements-dev.lock pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.lock -r requirements-dev.lock
	$(BIN)/pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

protos: venv
	$(BIN)/python tools/gen_protos.py

protos-check: venv
	$(BIN)/python tools/gen_protos.py --check

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: venv
	$(BIN)/mypy windflow services kernels tools tests

compose-lint:
	@if command -v docker-compose >/dev/null 2>&1; then \
		docker-compose -f docker-compose.yml config -q && echo "docker-compose.yml: ok"; \
	else echo "docker-compose not installed: skipping compose lint (CI installs it)"; fi

test: venv protos-check lint typecheck compose-lint
	$(BIN)/python -m pytest -q

demo: venv
	$(BIN)/windflow demo --out demo.mp4

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
