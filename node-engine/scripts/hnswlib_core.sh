#!/usr/bin/env bash
# Build and run hnswlib_core.cpp: hnswlib timed in-process, without the Python binding.
#
# Usage: hnswlib_core.sh PYTHON DATASET_DIR l2|ip M EF_CONSTRUCTION EF[,EF...] SINGLE_QUERIES REPS
#
# PYTHON is the peer venv's interpreter (the kit's setup_venv.sh); the program is compiled
# against the headers of the hnswlib version installed there, taken from that version's
# source archive on PyPI (checked against PyPI's sha256), with the flags its binding is built
# with (setup.py's -O3 -march=native, Python's -DNDEBUG -fwrapv). The archive and binary are
# cached in ${HNSWLIB_CORE_CACHE:-/tmp/hnswlib-core}.
set -euo pipefail
if [ $# -ne 8 ]; then
  sed -n 2,10p "$0" >&2
  exit 2
fi
py=$1; shift
here=$(cd "$(dirname "$0")" && pwd)
version=$("$py" -c 'import importlib.metadata as m; print(m.version("hnswlib"))')
cache=${HNSWLIB_CORE_CACHE:-/tmp/hnswlib-core}/$version
mkdir -p "$cache"
if [ ! -f "$cache/hnswlib-$version/hnswlib/hnswalg.h" ]; then
  link=$(curl -fsS https://pypi.org/simple/hnswlib/ | grep -o "https://[^\"]*/hnswlib-$version\.tar\.gz#sha256=[0-9a-f]*" | head -n1)
  if [ -z "$link" ]; then
    echo "no source archive of hnswlib $version on PyPI" >&2
    exit 1
  fi
  curl -fsSL -o "$cache/src.tar.gz" "${link%%#*}"
  echo "${link##*sha256=}  $cache/src.tar.gz" | sha256sum -c --quiet
  tar -xzf "$cache/src.tar.gz" -C "$cache"
fi
bin=$cache/hnswlib_core
if [ ! -x "$bin" ] || [ "$here/hnswlib_core.cpp" -nt "$bin" ]; then
  g++ -O3 -march=native -DNDEBUG -fwrapv -std=c++17 -pthread -I "$cache/hnswlib-$version" "$here/hnswlib_core.cpp" -o "$bin"
fi
exec "$bin" "$@"
