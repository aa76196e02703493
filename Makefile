# openmeet-matrix-operator: the two commands are `make dev` and `make test`.
SHELL := /bin/bash
CARGO ?= cargo
BIN := target/debug/openmeet-matrix-operator

.PHONY: all build test lint fmt-check clippy crds crd-check unit integration dev stack-tools clean bench chart chaos

all: build

build:
	$(CARGO) build --bins

## Regenerate crds/ from the Rust types.
crds:
	$(CARGO) run --quiet -- crd > crds/crds.yaml

## Fail when crds/ is stale.
crd-check:
	@$(CARGO) run --quiet -- crd | diff -u crds/crds.yaml - \
	  || { echo "crds/ is stale: run 'make crds' and commit the result" >&2; exit 1; }

fmt-check:
	$(CARGO) fmt --all -- --check

clippy:
	$(CARGO) clippy --all-targets -- -D warnings

lint: fmt-check clippy crd-check

unit:
	$(CARGO) test --lib --bins

## Integration tests start the local stack themselves (tests/stack/up.sh).
integration: stack-tools
	$(CARGO) test --test integration

## Build (once, cached by version) kube-apiserver, etcd, kubectl, Synapse,
## helm and the health tool (kstatus + Argo CD's Lua interpreter).
stack-tools:
	@tests/stack/build-tools.sh >/dev/null
	@tests/stack/install-synapse.sh >/dev/null
	@tests/stack/build-helm.sh >/dev/null
	@tests/stack/build-health.sh >/dev/null

CHART := charts/openmeet-matrix-operator

## Lint the Helm chart (--strict) and render it with the values its schema requires.
chart:
	@helm="$$(tests/stack/build-helm.sh)/helm" \
	  && "$$helm" lint --strict $(CHART) -f $(CHART)/ci/test-values.yaml \
	  && "$$helm" template openmeet-matrix-operator $(CHART) --namespace openmeet-system \
	       -f $(CHART)/ci/test-values.yaml >/dev/null \
	  && echo "chart: lint and template clean"

## Everything CI runs: fmt, clippy, CRD drift, unit and integration tests.
test: lint unit integration

## Run the operator against a local stack with the samples applied.
dev: build stack-tools
	OPERATOR_BIN=$(abspath $(BIN)) tests/stack/dev.sh

clean:
	$(CARGO) clean

## Benchmark on the local stack (not a test): prints the figures in the README.
bench: stack-tools
	$(CARGO) bench --bench converge

## Chaos suite on the local stack (not part of `make test`): converge a tenant
## while the controller is SIGKILLed and Synapse restarts, then audit Synapse.
## A debug build: it checks correctness, not speed, and reuses the test build.
## CHAOS_SEED=<n> replays a run's schedule.
chaos: stack-tools
	$(CARGO) bench --profile dev --bench chaos
