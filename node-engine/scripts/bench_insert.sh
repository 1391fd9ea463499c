#!/bin/bash
# REST insert benchmark (issue 2): starts `shoal-engine standalone` on a fresh data dir, samples its
# RSS every 0.25 s, and runs `shoal-engine bench-insert` against it (batches of 10,000 rows,
# 4 connections, WAL fsynced per group commit), then 200 self-searches for the memory of a server
# whose every segment has been searched. Prints the client's JSON line and the load average.
#
# usage: node-engine/scripts/bench_insert.sh [BIN] [OUT_DIR]
#   BIN      the release binary (default target/release/shoal-engine)
#   OUT_DIR  where server.log, rss.txt and result.json go (default /tmp/shoal-bench-insert)
# Dataset: $SHOAL_BENCH_DATA/clustered-1m-128 (default /tmp/shoal-bench-data), from
# ../shared/bench/gen_clustered.py.
set -u
BIN=${1:-target/release/shoal-engine}
OUT=${2:-/tmp/shoal-bench-insert}
D=${SHOAL_BENCH_DATA:-/tmp/shoal-bench-data}/clustered-1m-128
PORT=${PORT:-19630}
[ -x "$BIN" ] || { echo "no binary at $BIN (cargo build --release -p shoal-engine)" >&2; exit 2; }
[ -f "$D/base.fvecs" ] || { echo "no dataset at $D (see ../shared/bench/README.md)" >&2; exit 2; }
rm -rf "$OUT"; mkdir -p "$OUT"
DATA=$OUT/data
"$BIN" standalone --data-dir "$DATA" --listen 127.0.0.1:$PORT --metrics-listen 127.0.0.1:$((PORT + 1)) > "$OUT/server.log" 2>&1 &
PID=$!
trap 'kill $PID 2>/dev/null' EXIT
for _ in $(seq 1 100); do curl -s -o /dev/null 127.0.0.1:$((PORT + 1))/healthz && break; sleep 0.1; done
( while kill -0 $PID 2>/dev/null; do
    echo "$(date +%s.%N) $(grep -E '^(VmRSS|RssAnon|RssFile):' /proc/$PID/status | awk '{printf "%s %s ", $1, $2}')"
    sleep 0.25
  done ) > "$OUT/rss.txt" &
uptime > "$OUT/uptime.txt"
timeout 900 "$BIN" bench-insert --base "$D/base.fvecs" --addr 127.0.0.1:$PORT --batch 10000 \
  --connections 4 --server-pid $PID --search-after 200 > "$OUT/result.json" 2> "$OUT/client.log"
echo "client rc=$?" >> "$OUT/client.log"
uptime >> "$OUT/uptime.txt"
cat "$OUT/result.json" "$OUT/uptime.txt"
