# Windflow: two commands on a fresh machine -> `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TS := clients/typescript

.PHONY: venv demo test lint typecheck protos protos-check compose-lint k8s-lint ts ts-run clean

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

# deploy/k8s (docs/operations.md, "Kubernetes"), offline: yamllint --strict over every file,
# then each kustomization rendered (windflow/ops/k8s.py: kustomize is not on PyPI) and
# validated by kubernetes-validate --strict against the schemas it bundles; `check` also
# fails on a kind without a schema.
K8S_VERSION := 1.33.0
k8s-lint: venv
	$(BIN)/yamllint --strict -c deploy/k8s/.yamllint.yaml deploy/k8s
	@out=$$(mktemp -d) && trap 'rm -rf "$$out"' EXIT && \
		$(BIN)/python -m windflow.ops.k8s render --out "$$out" && \
		$(BIN)/kubernetes-validate --strict --quiet -k $(K8S_VERSION) "$$out"/*.yaml
	$(BIN)/python -m windflow.ops.k8s check --kubernetes-version $(K8S_VERSION)

# The TypeScript SDK and the bridge's page (clients/typescript, docs/browser.md): generated
# code and static/app.js up to date, tsc --noEmit, the esbuild builds, node --test against a
# live `windflow up`. Skipped where node or npm is missing.
ts:
	@if command -v node >/dev/null 2>&1 && command -v npm >/dev/null 2>&1; then \
		$(MAKE) --no-print-directory ts-run; \
	else echo "node/npm not installed: skipping the TypeScript SDK (CI installs them)"; fi

$(TS)/node_modules/.installed: $(TS)/package.json $(TS)/package-lock.json
	cd $(TS) && npm ci --no-audit --no-fund
	touch $@

ts-run: venv $(TS)/node_modules/.installed
	cd $(TS) && node scripts/gen.mjs --check
	cd $(TS) && node_modules/.bin/tsc --noEmit -p .
	cd $(TS) && node scripts/build.mjs --check
	cd $(TS) && node scripts/build.mjs
	cd $(TS) && node test/run.mjs

test: venv protos-check lint typecheck compose-lint k8s-lint ts
	$(BIN)/python -m pytest -q

demo: venv
	$(BIN)/windflow demo --out demo.mp4

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache $(TS)/node_modules $(TS)/dist $(TS)/build
