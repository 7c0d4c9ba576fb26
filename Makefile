# Tally's two commands are `make up` and `make test`; the rest are for working on it.
SHELL := /bin/bash
export TALLY_CACHE ?= $(HOME)/.cache/tally
export CARGO_TARGET_DIR ?= $(TALLY_CACHE)/target

.PHONY: up down status restart clean install test lint fmt build bench bench-ingest bench-consumer bench-query bench-archiver cluster-up cluster-down test-cluster bench-cluster loadtest verify-e2e chaos chaos-long plots k8s-check test-dashboard screenshots

up: ## install what is missing, start the stack and the services, create a demo org, send demo traffic
	@bash dev/stack.sh up

down: ## stop everything `make up` started
	@bash dev/stack.sh down

status: ## show each component
	@bash dev/stack.sh status

restart: ## restart one component: make restart SERVICE=ingest
	@test -n "$(SERVICE)" || { echo "usage: make restart SERVICE=<ingest|consumer|query-api|kafka|clickhouse|s3>"; exit 2; }
	@bash dev/stack.sh restart $(SERVICE)

clean: ## stop everything and delete .dev/ (all local data)
	@bash dev/stack.sh clean

install: ## install the local stack's components without starting them
	@bash dev/stack.sh install

build:
	cargo build --release --locked --bins

test: ## every test against the real local stack (started if needed), then the ClickHouse compatibility check
	@bash dev/test.sh

lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets --locked --features tally-consumer/failpoints -- -D warnings

fmt:
	cargo fmt --all

bench: bench-ingest bench-consumer bench-query bench-archiver ## every benchmark (figures go to loadtest/RESULTS.md by hand, with the command)

bench-ingest: ## ingest throughput: ceiling vs discard sink vs real Kafka, at 1/100/1000 events per request
	@bash dev/stack.sh infra-up
	cargo build --release --locked --bins -q
	python3 loadtest/bench_ingest.py $(BENCH_ARGS)

bench-consumer: ## consumer drain: raw ceiling vs tally-consumer vs ClickHouse's Kafka engine (20 M events), then freshness at 50 000 events/s
	@bash dev/stack.sh infra-up
	cargo build --release --locked --bins -q
	python3 loadtest/bench_consumer.py $(BENCH_ARGS)

bench-query: ## query API latency on 50 M events of 1000 orgs over 30 days, each endpoint at 200 requests/s (tally-loadgen, open model)
	@bash dev/stack.sh infra-up
	cargo build --release --locked --bins -q
	python3 loadtest/bench_query.py $(BENCH_ARGS)

bench-archiver: ## archiver: rows/s vs the raw read ceiling, bytes/event vs system.parts and chdb's Parquet, peak RSS at 5 M and 20 M rows, one org's read vs whole files
	@bash dev/stack.sh infra-up
	cargo build --release --locked --bins -q
	$$(bash dev/tools.sh) loadtest/bench_archiver.py $(BENCH_ARGS)

loadtest: ## one scenario of loadtest/k6/scenarios.json against `make up`'s stack with tally-loadgen: make loadtest SCENARIO=steady RATE=200 DURATION=30s
	@test -n "$(SCENARIO)" || { echo "usage: make loadtest SCENARIO=smoke|steady|spike|soak|many-orgs [RATE=…] [DURATION=30s] [BATCH=…] [ORGS=…]"; exit 2; }
	@bash dev/stack.sh up >/dev/null
	python3 loadtest/loadtest.py $(SCENARIO) $(if $(RATE),--rate $(RATE)) $(if $(DURATION),--duration $(DURATION)) $(if $(BATCH),--batch $(BATCH)) $(if $(ORGS),--orgs $(ORGS)) $(if $(RECORD),--record $(RECORD))

verify-e2e: ## the end-to-end ledger against `make up`'s stack: every accepted id stored once, rollups equal raw, every rejected event in the dead-letter topic with its reason
	@bash dev/stack.sh up >/dev/null
	python3 dev/verify_e2e.py $(VERIFY_ARGS)

chaos: ## the fault suite's short form (~5 min, part of make test): every fault once under load on a private stack in its own network namespace, then the ledger
	@bash dev/chaos.sh $(CHAOS_ARGS)

chaos-long: ## the long form (~25 min): every fault three times, ClickHouse down 60 s; recorded in loadtest/results/chaos-long.json
	@mkdir -p loadtest/results
	@bash dev/chaos.sh --long --record $(CURDIR)/loadtest/results/chaos-long.json $(CHAOS_ARGS)

test-dashboard: ## the dashboard in headless Chromium (also a step of make test): KPIs, charts, live updates, org isolation, phone width
	@bash dev/stack.sh infra-up
	cargo build --locked --bins -q
	@bash dev/dashboard_test.sh

screenshots: ## the dashboard test, keeping its screenshots in docs/img/ (the README shows them)
	@bash dev/stack.sh infra-up
	cargo build --locked --bins -q
	@bash dev/dashboard_test.sh --screenshots $(CURDIR)/docs/img

plots: ## the PNG of every recorded run in loadtest/results/ (loadtest/plot.py, matplotlib)
	$$(bash dev/tools.sh plot) loadtest/plot.py loadtest/results/*.json

k8s-check: ## k8s/ without a cluster: overlays rendered, validated against Kubernetes' and the operators' schemas, invariants, alert unit tests, checkov (also a step of make test)
	@bash dev/k8s_check.sh

bench-cluster: ## the cluster vs one server: one consumer on each, then two on the cluster; rows/s and CPU per million rows (docs/scaling.md)
	@bash dev/stack.sh infra-up
	@bash dev/cluster.sh infra-up
	cargo build --release --locked --bins -q
	python3 loadtest/bench_cluster.py $(BENCH_ARGS)

cluster-up: ## Tally on the local cluster: ZooKeeper, ClickHouse 2 shards x 2 replicas, 3 Kafka brokers, 2 consumers, 2 ingest behind nginx, the query API; demo org and traffic
	@bash dev/cluster.sh up

test-cluster: ## the cluster suite (docs/scaling.md): smoke, schema, then exactly once under kill -9 / broker restart / replica down 60 s / shard down 30 s, the archiver on the cluster, and the cluster's answers vs a single node's
	@bash dev/cluster.sh up
	@bash dev/cluster.sh smoke
	@bash dev/cluster.sh schema
	python3 dev/cluster_test.py $(CLUSTER_TEST_ARGS)
	python3 dev/cluster_archive.py --bin-dir $${CARGO_TARGET_DIR:-$$HOME/.cache/tally/target}/release
	@bash dev/stack.sh up >/dev/null
	python3 dev/cluster_compare.py

cluster-down: ## stop the local cluster
	@bash dev/cluster.sh down
