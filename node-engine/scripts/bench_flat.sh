#!/bin/bash
# FLAT exact search beside faiss IndexFlatL2, back to back on the same data and threads (issue 2):
# single-query (first 100 queries, 1 thread, k=10) and batch (all 10,000 queries, 2 threads,
# k=10 and k=100), each system's run right after the other's. One JSON line per run.
#
# usage: node-engine/scripts/bench_flat.sh [BIN] [PYTHON]
#   BIN     release shoal-engine (default target/release/shoal-engine)
#   PYTHON  a python with faiss (default /tmp/shoal-peers-venv/bin/python, made by
#           ../shared/bench/setup_venv.sh)
# faiss runs with OPENBLAS_CORETYPE=SkylakeX (its BLAS at the widest kernel of this machine).
set -u
BIN=${1:-target/release/shoal-engine}
PY=${2:-/tmp/shoal-peers-venv/bin/python}
D=${SHOAL_BENCH_DATA:-/tmp/shoal-bench-data}/clustered-1m-128
HERE=$(dirname "$0")
FAISS="env OPENBLAS_CORETYPE=SkylakeX $PY $HERE/faiss_flat.py $D"
OURS="$BIN bench --base $D/base.fvecs --query $D/query.fvecs --groundtruth $D/groundtruth.ivecs --index FLAT"
echo "# $(date -u +%FT%TZ) $(uptime)"
$OURS --mode single --single-queries 100 --reps 3
$FAISS --mode single --queries 100 --reps 3
$OURS --mode single --single-queries 100 --reps 3
$FAISS --mode single --queries 100 --reps 3
$OURS --mode batch --threads 2 -k 10 --reps 1
$FAISS --mode batch --threads 2 -k 10 --reps 1
$OURS --mode batch --threads 2 -k 100 --reps 1
$FAISS --mode batch --threads 2 -k 100 --reps 1
echo "# $(date -u +%FT%TZ) $(uptime)"
