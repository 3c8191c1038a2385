#!/usr/bin/env bash
# DNS frontend benchmark: meduza's frontend vs dnsmasq, both on loopback, both
# forwarding to the same dnsmasq upstream (--address=/test/10.0.0.1), dnsperf as the
# client. Prints figures and ratios (meduza / dnsmasq) measured in this run.
#
#   tests/bench/dns.sh            # builds target/release/meduza if needed
#   RUNS=3 DURATION=8 tests/bench/dns.sh
#
# Scenarios, each at 100 and 500 outstanding queries (dnsperf -q):
#   cache-hit  100 hot names, caches warm (dnsmasq --cache-size=10000)
#   forwarded  unique names, frontend caches disabled (dnsmasq --cache-size=0)
# Per scenario: QPS (median of RUNS), loss %, p99 latency (a separate dnsperf -v
# run at the same load, percentiles computed from its per-query latencies), and the
# RSS (VmRSS / VmHWM) of both frontends at the end, and the server's CPU time per
# answered query (utime+stime over the runs / queries answered): on 2 shared cores the
# client is often the bottleneck at q=100, and CPU per query shows the server's cost.
set -euo pipefail

RUNS=${RUNS:-3}
DURATION=${DURATION:-8}
CLIENTS=${CLIENTS:-16}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=${MEDUZA_BIN:-$TARGET/release/meduza}

for tool in dnsmasq dnsperf awk; do
  command -v "$tool" >/dev/null || { echo "missing $tool (apt-get install dnsmasq-base dnsperf)" >&2; exit 1; }
done
if [[ -z "${MEDUZA_BIN:-}" ]]; then
  (cd "$ROOT" && cargo build --release --bin meduza >&2)
fi

UP_IP=127.0.0.71; UP_PORT=15300
DM_IP=127.0.0.72; DM_PORT=15301
MZ_IP=127.0.0.73; MZ_PORT=15302
WORK=$(mktemp -d /tmp/meduza-dns-bench.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# Query files.
for i in $(seq 1 100); do echo "hot$i.test A"; done >"$WORK/hot.txt"
awk 'BEGIN { for (i = 1; i <= 400000; i++) printf "u%d.test A\n", i }' >"$WORK/uniq.txt"

dnsmasq -k --conf-file=/dev/null --port=$UP_PORT --listen-address=$UP_IP --bind-interfaces \
  --address=/test/10.0.0.1 --local-ttl=600 --no-resolv --no-hosts --pid-file= \
  --cache-size=0 --dns-forward-max=1000 &
PIDS+=($!)

cat >"$WORK/plan.json" <<JSON
{"hosts": {}, "mosdns_enabled": false, "clash_enabled": false,
 "upstreams": [{"name": "bench", "addresses": ["$UP_IP:$UP_PORT"], "priority": 1, "enable": true,
   "health_check": {"enable": true, "interval_secs": 30, "timeout_secs": 5},
   "failover": {"enable": true, "threshold": 3}}]}
JSON

SERVER_PID=
start_dnsmasq() { # $1 = cache size
  dnsmasq -k --conf-file=/dev/null --port=$DM_PORT --listen-address=$DM_IP --bind-interfaces \
    --server=$UP_IP#$UP_PORT --no-resolv --no-hosts --pid-file= --cache-size="$1" &
  SERVER_PID=$!
}
start_meduza() { # $1 = cache size
  RUST_LOG=warn "$BIN" dns serve --plan "$WORK/plan.json" --listen "$MZ_IP:$MZ_PORT" \
    --cache-size "$1" --health-check-name health.test ${MEDUZA_ARGS:-} &
  SERVER_PID=$!
}
stop_server() { kill "$SERVER_PID" 2>/dev/null || true; wait "$SERVER_PID" 2>/dev/null || true; }
wait_up() { # ip port
  for _ in $(seq 1 100); do
    dig +short +time=1 +tries=1 @"$1" -p "$2" ready.test A 2>/dev/null | grep -q 10.0.0.1 && return 0
    sleep 0.05
  done
  echo "server $1:$2 did not come up" >&2; exit 1
}
rss() { awk '/^VmRSS/ {r=$2} /^VmHWM/ {h=$2} END {printf "%.1f/%.1f", r/1024, h/1024}' "/proc/$1/status"; }

# dnsperf summary → "qps loss%"
perf_run() { # ip port file q
  dnsperf -s "$1" -p "$2" -d "$3" -l "$DURATION" -c "$CLIENTS" -q "$4" -t 2 2>/dev/null |
    awk '/Queries sent:/ {s=$3} /Queries lost:/ {l=$3} /Queries per second:/ {q=$4}
         END {printf "%.0f %.3f\n", q, (s > 0 ? 100 * l / s : 100)}'
}
# p99 latency in ms from a verbose run (one line per answered query, latency last).
perf_p99() { # ip port file q
  dnsperf -s "$1" -p "$2" -d "$3" -l 3 -c "$CLIENTS" -q "$4" -t 2 -v 2>/dev/null |
    awk '$1 == ">" { print $NF * 1000 }' | sort -n |
    awk '{a[NR] = $1} END { if (NR == 0) { print "nan" } else { i = int(NR * 0.99); if (i < 1) i = 1; printf "%.2f\n", a[i] } }'
}
median() { sort -n | awk '{a[NR]=$1} END {print (NR % 2 ? a[(NR+1)/2] : (a[NR/2] + a[NR/2+1]) / 2)}'; }

declare -A QPS LOSS P99 RSS CPU
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
HZ=$(getconf CLK_TCK)
bench() { # name scenario cache file
  local name=$1 scen=$2 cache=$3 file=$4 ip port
  if [[ $name == dnsmasq ]]; then ip=$DM_IP; port=$DM_PORT; start_dnsmasq "$cache"
  else ip=$MZ_IP; port=$MZ_PORT; start_meduza "$cache"; fi
  wait_up "$ip" "$port"
  local pid=$SERVER_PID
  [[ $scen == cache-hit ]] && dnsperf -s "$ip" -p "$port" -d "$file" -n 2 -c 1 -q 10 >/dev/null 2>&1
  for q in 100 500; do
    local qs=() ls=() t0 t1 answered=0
    t0=$(ticks "$pid")
    for _ in $(seq 1 "$RUNS"); do
      read -r qv lv < <(perf_run "$ip" "$port" "$file" "$q")
      qs+=("$qv"); ls+=("$lv")
      answered=$((answered + qv * DURATION))
    done
    t1=$(ticks "$pid")
    CPU[$name,$scen,$q]=$(awk -v t=$((t1 - t0)) -v hz="$HZ" -v n="$answered" 'BEGIN {printf "%.2f", (n > 0 ? t / hz * 1e6 / n : 0)}')
    QPS[$name,$scen,$q]=$(printf '%s\n' "${qs[@]}" | median)
    LOSS[$name,$scen,$q]=$(printf '%s\n' "${ls[@]}" | sort -n | tail -1)
    P99[$name,$scen,$q]=$(perf_p99 "$ip" "$port" "$file" "$q")
  done
  RSS[$name,$scen]=$(rss "$pid")
  stop_server
}

for scen in cache-hit forwarded; do
  if [[ $scen == cache-hit ]]; then cache=10000; file=$WORK/hot.txt; else cache=0; file=$WORK/uniq.txt; fi
  bench dnsmasq "$scen" "$cache" "$file"
  bench meduza "$scen" "$cache" "$file"
done

echo "# DNS frontend benchmark $(date -u +%Y-%m-%dT%H:%MZ) on $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
echo "# dnsperf -l $DURATION -c $CLIENTS, median of $RUNS runs; loss = worst run; p99 from a 3 s dnsperf -v run"
printf '%-10s %4s | %10s %10s %6s | %8s %8s | %8s %8s | %9s %9s | %7s %7s %6s\n' \
  scenario q "dnsmasq" "meduza" ratio "loss-dm%" "loss-mz%" "p99dm-ms" "p99mz-ms" "rss-dm" "rss-mz" "cpu-dm" "cpu-mz" "eff"
for scen in cache-hit forwarded; do
  for q in 100 500; do
    d=${QPS[dnsmasq,$scen,$q]}; m=${QPS[meduza,$scen,$q]}
    ratio=$(awk -v m="$m" -v d="$d" 'BEGIN {printf "%.2f", (d > 0 ? m / d : 0)}')
    cd_=${CPU[dnsmasq,$scen,$q]}; cm=${CPU[meduza,$scen,$q]}
    eff=$(awk -v a="$cd_" -v b="$cm" 'BEGIN {printf "%.2f", (b > 0 ? a / b : 0)}')
    printf '%-10s %4s | %10s %10s %5sx | %8s %8s | %8s %8s | %9s %9s | %7s %7s %5sx\n' "$scen" "$q" "$d" "$m" "$ratio" \
      "${LOSS[dnsmasq,$scen,$q]}" "${LOSS[meduza,$scen,$q]}" "${P99[dnsmasq,$scen,$q]}" "${P99[meduza,$scen,$q]}" \
      "${RSS[dnsmasq,$scen]}" "${RSS[meduza,$scen]}" "$cd_" "$cm" "$eff"
  done
done
echo "# rss columns: VmRSS/VmHWM in MiB at the end of the scenario"
echo "# cpu columns: server CPU microseconds per answered query; eff = dnsmasq cpu / meduza cpu"
echo "# targets: cache-hit ratio >= 1.5, forwarded ratio >= 1.0, meduza loss 0% at q=500, meduza RSS < 15 MiB"
