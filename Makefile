# One way in for people and CI. Every target installs and starts what it needs itself.
SHELL := /usr/bin/env bash
.DEFAULT_GOAL := help
export PATH := $(CURDIR)/.data/bin:$(PATH)

NODES ?= 3

.PHONY: help
help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

.PHONY: deps
deps: ## Install what is missing (PostgreSQL, Redis, helm, schemathesis, kubernetes-validate)
	@scripts/deps.sh

.PHONY: stack-up stack-down
stack-up: ## Start the local PostgreSQL and Redis (data in .data/)
	@scripts/stack.sh up
stack-down: ## Stop the local PostgreSQL and Redis
	@scripts/stack.sh down

.PHONY: build
build:
	cargo build --workspace --bins

.PHONY: dev
dev: ## Run a local cluster of $(NODES) nodes in the foreground (Ctrl-C stops everything)
	@scripts/cluster.sh dev $(NODES)

.PHONY: up
up: ## Start the local cluster in the background; returns once the API answers
	@scripts/cluster.sh up $(NODES)

.PHONY: down
down: ## Stop the local cluster, PostgreSQL and Redis (data kept)
	@scripts/cluster.sh down

.PHONY: clean
clean: down ## Stop everything and remove the data folder
	rm -rf .data

.PHONY: fmt
fmt:
	cargo fmt --all

.PHONY: lint
lint: ## Formatting and clippy checks
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked -- -D warnings

.PHONY: test
test: ## Everything CI checks: lint, the whole test suite against real PostgreSQL and Redis, chart checks
	@scripts/test.sh

.PHONY: crds
crds: ## Regenerate the WalletMigration CRD files from the Rust types
	cargo run -q -p wallet-migrator -- crd > charts/wallet/crds/walletmigrations.wallet.dev.yaml
	cp charts/wallet/crds/walletmigrations.wallet.dev.yaml k8s/crds/walletmigrations.wallet.dev.yaml

.PHONY: images e2e e2e-prometheus
images: ## Both Dockerfile targets with podman (FROM a local debootstrap Debian where no registry answers)
	@scripts/images.sh
e2e: ## The chart's API and operator pods with podman kube play, then e2e-prometheus (fresh machine: installs podman etc.)
	@scripts/e2e.sh
	@scripts/e2e-prometheus.sh
e2e-prometheus: ## Real Prometheus scraping a 3-node cluster under load: dashboard, adapter and KEDA queries return data
	@scripts/e2e-prometheus.sh

.PHONY: bench soak bench-compare bench-events
.PHONY: chaos
chaos: ## Fault tests of node processes: kill -9, SIGSTOP, partitions (network namespaces), PostgreSQL and Redis faults, rolling restarts
	@scripts/chaos.sh

bench-compare: ## REV=<git rev>: that build against this tree, interleaved, fresh clusters (PAIRS, SCENARIOS, DURATION)
	@COMPARE_PAIRS=$(or $(PAIRS),4) COMPARE_SCENARIOS="$(or $(SCENARIOS),saturate-one multi-uniform constant)" \
	  COMPARE_DURATION=$(or $(DURATION),20s) scripts/bench-compare.sh "$(REV)"

bench-events: ## The outbox's cost: this build with WALLET_EVENTS_ENABLED=false against on, interleaved, fresh clusters
	@COMPARE_BASE_ENV=WALLET_EVENTS_ENABLED=false COMPARE_PAIRS=$(or $(PAIRS),3) \
	  COMPARE_SCENARIOS="$(or $(SCENARIOS),saturate-one multi-uniform)" \
	  COMPARE_DURATION=$(or $(DURATION),20s) scripts/bench-compare.sh HEAD

bench: ## Release build, 3-node cluster, every load scenario with exact-balance checks (< 10 min)
	@scripts/bench.sh all
soak: ## 30 minutes at 1000 RPS with node memory sampled every 10 s
	@scripts/bench.sh soak
