#!/bin/sh
# JetStream store benchmarks (issue 11), side by side on one R3 cluster of three local
# nats-server nodes (dist/nats/n{1,2,3}.conf, store dirs in a temp dir):
#   1. nats-py (NATS's Python client) publishing straight to JetStream, 64 acks outstanding;
#   2. unary Publish through one sluice gateway, 64 in flight (bench/publish.rs);
#   3. BatchPublish of 100 through the gateway, 8 in flight;
#   4. publish→delivery latency at 2,000 msg/s with an acking consumer (bench/consume.rs);
#   5. the same across two gateways: published through A, consumed on B (issue 12);
#   plus the gateway's idle and peak RSS next to the embedded daemon's idle RSS.
# nats-py is installed into target/bench-venv (pip, pinned). Ports 4222-4224 and 6222-6224.
# `bench/jetstream.sh latency` runs only the two latency runs (5) and (4), on a fresh cluster.
set -eu
ONLY=${1:-all}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NATS=${NATS_SERVER:-$(command -v nats-server || echo /usr/sbin/nats-server)}
[ -x "$NATS" ] || { echo "bench/jetstream.sh: nats-server not found (make deps installs it)"; exit 1; }
VENV=$ROOT/target/bench-venv
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q nats-py==2.16.0
WORK=$(mktemp -d)
trap 'kill $(cat "$WORK/pids") 2>/dev/null; sleep 1; rm -rf "$WORK"' EXIT INT TERM
cd "$WORK"
for n in 1 2 3; do
  "$NATS" -c "$ROOT/dist/nats/n$n.conf" >"n$n.log" 2>&1 &
  echo $! >>pids
done
SERVERS=127.0.0.1:4222,127.0.0.1:4223,127.0.0.1:4224
cd "$ROOT"
echo "machine: $(nproc) cores, $(uname -sr); $("$NATS" --version)"
echo
export SLUICE_BENCH_ARGS="--store nats://$SERVERS --nats-replicas 3"
if [ "$ONLY" = latency ]; then
  SLUICE_BENCH_LATENCY_RATE=2000 SLUICE_BENCH_ACK=1 cargo bench --quiet --bench consume -- latency-across 2>/dev/null | grep -v "^machine"
  SLUICE_BENCH_LATENCY_RATE=2000 SLUICE_BENCH_ACK=1 cargo bench --quiet --bench consume -- latency 2>/dev/null | grep -v "^machine"
  exit 0
fi
echo "| run | msgs/s | p50 ms | p99 ms |"
echo "|---|---|---|---|"
"$VENV/bin/python" bench/nats_py_publish.py "nats://$SERVERS" 10 64 3
echo
echo "embedded daemon (SQLite), idle:"
SLUICE_BENCH_ARGS= cargo bench --quiet --bench publish -- no-run-matches 2>/dev/null | grep "idle RSS"
echo "gateway (--store nats://..., R3):"
cargo bench --quiet --bench publish -- "64 in flight" 2>/dev/null | grep -v "^machine"
cargo bench --quiet --bench publish -- "BatchPublish 100 × 256 B, 8 in flight" 2>/dev/null | grep "^| Batch"
SLUICE_BENCH_LATENCY_RATE=2000 SLUICE_BENCH_ACK=1 cargo bench --quiet --bench consume -- latency 2>/dev/null | grep -v "^machine"
SLUICE_BENCH_LATENCY_RATE=2000 SLUICE_BENCH_ACK=1 cargo bench --quiet --bench consume -- latency-across 2>/dev/null | grep -v "^machine"
