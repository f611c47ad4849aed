#!/bin/bash
# samples once a second: disk write stats, WAL size, per-thread CPU of the daemon
out=$1
echo "t,wr_ios,wr_sectors,wr_ms,inflight,wal_bytes,db_bytes,writer_cpu,ckpt_cpu" > $out
start=$(date +%s.%N)
while true; do
  pid=$(pgrep -f "sluice serve" | head -1)
  [ -z "$pid" ] && { sleep 0.2; continue; }
  dir=$(tr '\0' '\n' < /proc/$pid/cmdline | awk 'f{print;exit} /--data-dir/{f=1}')
  read -r _ _ _ _ _ _ _ wios _ wsec wms inflight _ < <(awk '$3=="vda"{print $1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13}' /proc/diskstats)
  wal=$(stat -c %s $dir/sluice.db-wal 2>/dev/null || echo 0)
  db=$(stat -c %s $dir/sluice.db 2>/dev/null || echo 0)
  wcpu=0; ccpu=0
  for t in /proc/$pid/task/*; do
    n=$(cat $t/comm 2>/dev/null)
    c=$(awk '{print $14+$15}' $t/stat 2>/dev/null)
    case "$n" in sluice-writer) wcpu=$c;; sluice-checkpoi*) ccpu=$c;; esac
  done
  now=$(date +%s.%N)
  echo "$(echo "$now - $start" | bc),$wios,$wsec,$wms,$inflight,$wal,$db,$wcpu,$ccpu" >> $out
  sleep 1
done
