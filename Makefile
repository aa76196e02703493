# openmeet-matrix-operator: the two commands are `make dev` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
BIN := $(or $(CARGO_TARGET_DIR),target)/debug/openmeet-matrix-operator

.PHONY: all build test lint fmt-check clippy crds crd-check unit integration integration-postgres integration-mas dev stack-tools mas-tools clean bench chart chaos \
	ts-deps ts-types ts-types-check ts-unit

all: build

build:
	$(CARGO) build --bins

## Regenerate crds/ (and the chart's copy) from the Rust types, and the
## TypeScript kit's types from them.
crds:
	$(CARGO) run --quiet -- crd > crds/crds.yaml
	cp crds/crds.yaml $(CHART)/files/crds.yaml
	$(MAKE) --no-print-directory ts-types

## Fail when crds/ is stale.
crd-check:
	@$(CARGO) run --quiet -- crd | diff -u crds/crds.yaml - \
	  || { echo "crds/ is stale: run 'make crds' and commit the result" >&2; exit 1; }
	@cmp -s crds/crds.yaml $(CHART)/files/crds.yaml \
	  || { echo "$(CHART)/files/crds.yaml is stale: run 'make crds' and commit the result" >&2; exit 1; }

TS := clients/typescript
NPM ?= npm

## The TypeScript kit's locked dependencies: `npm ci` (from npm's own cache
## when it can), again only when package.json or package-lock.json change.
ts-deps: $(TS)/node_modules/.package-lock.json

$(TS)/node_modules/.package-lock.json: $(TS)/package.json $(TS)/package-lock.json
	@command -v $(NPM) >/dev/null || { echo "npm not found: install Node.js >= 20 and npm (apt-get install nodejs npm)" >&2; exit 1; }
	cd $(TS) && $(NPM) ci --prefer-offline --no-audit --no-fund --loglevel=error
	@touch $@

OPENAPI_TS := node node_modules/openapi-typescript/bin/cli.js ../../docs/sidecar-openapi.yaml

## Regenerate the kit's types: src/generated/crds.ts from crds/crds.yaml, and
## src/generated/sidecar.ts from docs/sidecar-openapi.yaml (openapi-typescript).
ts-types: ts-deps
	cd $(TS) && node scripts/generate-types.mjs ../../crds/crds.yaml src/generated/crds.ts
	cd $(TS) && $(OPENAPI_TS) -o src/generated/sidecar.ts

## Fail when the kit's types are stale.
ts-types-check: ts-deps
	@cd $(TS) && node scripts/generate-types.mjs ../../crds/crds.yaml - | diff -u src/generated/crds.ts - \
	  || { echo "clients/typescript/src/generated/crds.ts is stale: run 'make ts-types' and commit the result" >&2; exit 1; }
	@cd $(TS) && $(OPENAPI_TS) 2>/dev/null | diff -u src/generated/sidecar.ts - \
	  || { echo "clients/typescript/src/generated/sidecar.ts is stale: run 'make ts-types' and commit the result" >&2; exit 1; }

## Type-check and build the kit, and run its unit tests (node --test).
ts-unit: ts-deps
	cd $(TS) && $(NPM) test --silent

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --all-targets -- -D warnings

lint: fmt-check clippy crd-check ts-types-check

unit: ts-unit
	$(CARGO) test --lib --bins

## Integration tests start the local stack themselves (tests/stack/up.sh).
integration: stack-tools ts-deps
	$(CARGO) test --test integration

## The same suite with Synapse on PostgreSQL (Debian's postgresql-15 server and
## libpq-dev; tests/stack/up.sh starts a throwaway cluster on loopback).
integration-postgres: stack-tools ts-deps
	@SYNAPSE_DATABASE=postgres tests/stack/install-synapse.sh >/dev/null
	SYNAPSE_DATABASE=postgres $(CARGO) test --test integration

## The integration suite in MAS mode, with Synapse delegating authentication
## to the Matrix Authentication Service on PostgreSQL (tests/stack/build-mas.sh
## builds it once, from MAS_SRC): the whole suite, and the mas:: and
## mas_signin:: tests the default runs ignore. Tests of the default mode's own
## paths skip themselves in MAS mode (`default_mode_only!`; the run prints each
## with its reason, and docs/development.md lists them). platform_kit:: and
## chart:: (chart_upgrade:: with it) are left out: what they test is the
## Kubernetes side (the kit's objects, the chart's rendering, RBAC and CRD
## upgrades; the chart's MAS values are rendered there too), the same in either
## mode, and the two default runs above have them.
integration-mas: stack-tools mas-tools
	MATRIX_AUTH=mas $(CARGO) test --test integration -- --include-ignored \
	  --skip platform_kit:: --skip chart:: --skip chart_upgrade::

## Build (once, cached by version) kube-apiserver, etcd, kubectl, Synapse,
## helm and the health tool (kstatus + Argo CD's Lua interpreter).
stack-tools:
	@tests/stack/build-tools.sh >/dev/null
	@tests/stack/install-synapse.sh >/dev/null
	@tests/stack/build-helm.sh >/dev/null
	@tests/stack/build-health.sh >/dev/null

## Build (once, cached by version) the Matrix Authentication Service, its
## policy and its stand-in assets, for MATRIX_AUTH=mas stacks (MAS_SRC: its source).
mas-tools:
	@tests/stack/build-mas.sh >/dev/null

CHART := charts/openmeet-matrix-operator

## Lint the Helm chart (--strict) and render it with the values its schema requires.
chart:
	@helm="$$(tests/stack/build-helm.sh)/helm" \
	  && "$$helm" lint --strict $(CHART) -f $(CHART)/ci/test-values.yaml \
	  && "$$helm" template openmeet-matrix-operator $(CHART) --namespace openmeet-system \
	       -f $(CHART)/ci/test-values.yaml >/dev/null \
	  && echo "chart: lint and template clean"

## Everything CI runs: fmt, clippy, CRD and TypeScript-type drift, unit tests, the
## integration suite three times (Synapse on SQLite, then on PostgreSQL, then in
## MAS mode: Synapse with MAS).
test: lint unit integration integration-postgres integration-mas

## Run the operator against a local stack with the samples applied.
dev: build stack-tools
	OPERATOR_BIN=$(abspath $(BIN)) tests/stack/dev.sh

clean:
	$(CARGO) clean

## Benchmark on the local stack (not a test): prints the figures in docs/benchmarks.md.
bench: stack-tools
	$(CARGO) bench --bench converge

## Chaos suite on the local stack (not part of `make test`): converge a tenant
## while the controller is SIGKILLed and Synapse restarts, then audit Synapse.
## A debug build: it checks correctness, not speed, and reuses the test build.
## CHAOS_SEED=<n> replays a run's schedule.
chaos: stack-tools
	$(CARGO) bench --profile dev --bench chaos
