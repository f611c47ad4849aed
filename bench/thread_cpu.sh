#!/bin/bash
# CPU per message of each daemon thread during one row of bench/publish.rs:
#   SLUICE_BIN=/path/to/sluice bench/thread_cpu.sh "8 in flight, built per call, a fresh"
# Runs the row for 14 s (SLUICE_BENCH_SECS), samples utime+stime of every thread of the daemon
# from /proc over 10 s in the middle, and prints the row's throughput and p999 with the
# microseconds of CPU each thread spent per message. Throughput on this VM swings ±10 % from run
# to run; the writer's CPU per message swings far less, so it is what to compare between builds.
set -eu
row=${1:?usage: SLUICE_BIN=... bench/thread_cpu.sh ROW-FILTER}
bin=${SLUICE_BIN:?set SLUICE_BIN to the daemon binary}
cd "$(dirname "$0")/.."
cargo bench --locked --bench publish --no-run >/dev/null 2>&1
out=$(mktemp)
trap 'rm -f "$out" "$out.1" "$out.2"' EXIT
SLUICE_BENCH_SECS=14 cargo bench --locked --bench publish -- "$row" >"$out" 2>&1 &
bench=$!
sleep 2.5
pid=$(pgrep -f "$bin serve" | head -1)
snap() {
  for t in /proc/"$pid"/task/*; do
    echo "$(tr ' ' _ <"$t"/comm) $(awk '{print $14 + $15}' "$t"/stat)"
  done
}
snap >"$out.1"
sleep 10
snap >"$out.2"
wait "$bench"
row_line=$(grep '^| [A-Za-z]' "$out" | grep -v '^| run' | tail -1)
TICKS=$(getconf CLK_TCK) ROW="$row_line" python3 - "$out.1" "$out.2" <<'P'
import os, sys
def load(path):
    d = {}
    for line in open(path):
        name, ticks = line.split()
        d[name] = d.get(name, 0) + int(ticks)
    return d
a, b = load(sys.argv[1]), load(sys.argv[2])
cols = [c.strip() for c in os.environ["ROW"].split("|")]
rate, p999 = float(cols[2]), cols[5]
ticks = int(os.environ["TICKS"])
per = " ".join(
    f"{k}={(b[k] - a.get(k, 0)) / ticks / 10 / rate * 1e6:.2f}us"
    for k in sorted(b) if b[k] - a.get(k, 0) > 2)
print(f"{rate:.0f} msg/s, p999 {p999} ms | CPU per message: {per}")
P
