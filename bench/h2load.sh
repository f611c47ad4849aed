#!/usr/bin/env bash
# Peak unary Publish throughput measured with h2load (nghttp2's C load
# generator, far lighter than any Rust/tonic client on a 2-core box), with
# p50/p99/p999 from its per-request log and the daemon's peak RSS.
# Usage: bench/h2load.sh [requests] ; needs h2load (Debian: nghttp2-client).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-300000}
if ! command -v h2load >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    apt-get install -y -qq nghttp2-client >/dev/null || { apt-get update -qq && apt-get install -y -qq nghttp2-client >/dev/null; }
  else
    echo "h2load not found: install nghttp2-client" >&2; exit 1
  fi
fi
BIN=${SLUICE_BIN:-}
if [ -z "$BIN" ]; then cargo build --release --locked -q; BIN=./target/release/sluice; fi
work=$(mktemp -d "${TMPDIR:-/var/tmp}/sluice-h2load.XXXXXX")
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -rf "$work"' EXIT
python3 - "$work/publish.bin" <<'PY'
import struct, sys
topic, payload = b"h2load", b"x" * 256
body = b"\x0a" + bytes([len(topic)]) + topic + b"\x12" + bytes([0x80 | (256 & 0x7f), 256 >> 7]) + payload
open(sys.argv[1], "wb").write(b"\x00" + struct.pack(">I", len(body)) + body)
PY
"$BIN" serve --port 0 --data-dir "$work/data" --log-level info 2>"$work/log" &
pid=$!
for _ in $(seq 100); do grep -q "listening on" "$work/log" && break; sleep 0.05; done
port=$(sed -n 's/.*listening on [^ ]*:\([0-9]*\).*/\1/p' "$work/log" | head -1)
echo "machine: $(nproc) cores, $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)"
echo "idle RSS: $(awk '/VmRSS/ {printf "%.1f MiB", $2/1024}' /proc/$pid/status)"
echo
echo "| h2load run | msgs/s | p50 ms | p99 ms | p999 ms | failed | peak RSS MiB |"
echo "|---|---|---|---|---|---|---|"
for spec in "1 1" "4 16" "4 64"; do
  set -- $spec
  rm -f "$work/lat"
  out=$(h2load -n "$N" -c "$1" -m "$2" -d "$work/publish.bin" --log-file="$work/lat" \
        -H 'content-type: application/grpc' -H 'te: trailers' \
        "http://127.0.0.1:$port/sluice.v1.Sluice/Publish" 2>&1)
  rate=$(echo "$out" | sed -n 's/.*finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p')
  failed=$(echo "$out" | sed -n 's/.* \([0-9]*\) failed.*/\1/p')
  pct=$(awk '{print $3}' "$work/lat" | sort -n | awk '{a[NR]=$1} END {printf "%.3f | %.3f | %.3f", a[int(NR*0.5)]/1000, a[int(NR*0.99)]/1000, a[int(NR*0.999)]/1000}')
  rss=$(awk '/VmHWM/ {printf "%.1f", $2/1024}' /proc/$pid/status)
  echo "| unary 256 B, $(( $1 * $2 )) in flight ($1 conns × $2 streams) | ${rate%.*} | $pct | $failed | $rss |"
done
python3 - "$work/batch.bin" <<'PY'
import struct, sys
def varint(n):
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        if n:
            out += bytes([b | 0x80])
        else:
            return out + bytes([b])
topic, msg = b"h2load-batch", b"\x0a" + varint(256) + b"y" * 256
body = b"\x0a" + varint(len(topic)) + topic + b"".join(b"\x12" + varint(len(msg)) + msg for _ in range(100))
open(sys.argv[1], "wb").write(b"\x00" + struct.pack(">I", len(body)) + body)
PY
for spec in "1 1" "2 4"; do
  set -- $spec
  # Batch rows: long enough (4 M messages at the default N) that a run is not
  # decided by its first seconds.
  B=$(( N * 2 / 15 ))
  rm -f "$work/lat"
  out=$(h2load -n "$B" -c "$1" -m "$2" -d "$work/batch.bin" --log-file="$work/lat" \
        -H 'content-type: application/grpc' -H 'te: trailers' \
        "http://127.0.0.1:$port/sluice.v1.Sluice/BatchPublish" 2>&1)
  rate=$(echo "$out" | sed -n 's/.*finished in [^,]*, \([0-9.]*\) req\/s.*/\1/p')
  failed=$(echo "$out" | sed -n 's/.* \([0-9]*\) failed.*/\1/p')
  pct=$(awk '{print $3}' "$work/lat" | sort -n | awk '{a[NR]=$1} END {printf "%.3f | %.3f | %.3f", a[int(NR*0.5)]/1000, a[int(NR*0.99)]/1000, a[int(NR*0.999)]/1000}')
  rss=$(awk '/VmHWM/ {printf "%.1f", $2/1024}' /proc/$pid/status)
  echo "| BatchPublish 100 × 256 B, $(( $1 * $2 )) in flight | $(python3 -c "print(int(float('$rate') * 100))") msgs/s | $pct (per call) | $failed | $rss |"
done
# h2load counts any HTTP 200 as success: check what was stored.
kill -TERM $pid; wait $pid || true
rows=$(python3 -c "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('select count(*) from messages').fetchone()[0])" "$work/data/sluice.db")
echo
echo "rows stored: $rows (expected $(( N * 3 + N * 2 / 15 * 2 * 100 )))"
exit 0
