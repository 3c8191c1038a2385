#!/usr/bin/env bash
# Reconcile latency and footprint of the full gateway agent (`meduza run`).
#
# Everything runs in a private network namespace (etcd on its loopback, meduza with
# MEDUZA_DATAPLANE=off, DNS on 127.0.0.1:53 and the API on 127.0.0.1:9100 of that
# namespace), so the host's network is not touched. Needs root.
#
# 1. Latency, commit -> applied: a client on etcd's JSON gateway puts a config key,
#    then (clock starts) puts /commit, and waits on a watch of
#    /updated/<id>/applied until it shows /commit's new revision (clock stops).
#    COMMITS commits (default 200, after 5 warm-up commits) for each change:
#    - dns: swaps the priority of a DNS upstream group (1 <-> 3). The pass reloads the
#      snapshot from etcd, parses, renders every domain, compares per domain, writes
#      no file, restarts nothing, hands the DNS frontend its new plan, publishes.
#    - restart: changes a generic tunnel's args (/bin/sleep N): the same pass plus
#      the supervisor stopping that one child (SIGTERM, reap) and starting it again.
# 2. Footprint with 6 generic tunnel children (/bin/sleep) idle for DURATION seconds
#    (default 60), next to supervisord running the same 6 children in the same run:
#    RSS (VmRSS), PSS (smaps_rollup), CPU = utime+stime delta as % of one core.
# Targets (issue 3): dns p99 < 100 ms; meduza RSS < 1/3 of supervisord's; idle CPU < 0.5 %.
#
# Usage: tests/bench/reconcile.sh [DURATION_SECS]
# Env: MEDUZA_BIN (default: cargo build --release), COMMITS (default 200).
set -euo pipefail

DURATION=${1:-60}
COMMITS=${COMMITS:-200}
here=$(cd "$(dirname "$0")/../.." && pwd)
for p in etcd etcdctl supervisord python3 ip; do
  command -v "$p" >/dev/null || { echo "$p missing (scripts/install-deps)" >&2; exit 1; }
done
[[ $(id -u) == 0 ]] || { echo "needs root (network namespace)" >&2; exit 1; }

if [[ -z "${MEDUZA_BIN:-}" ]]; then
  (cd "$here" && cargo build --release --quiet --bin meduza)
  MEDUZA_BIN="${CARGO_TARGET_DIR:-$here/target}/release/meduza"
fi

work=$(mktemp -d /tmp/meduza-bench-rec.XXXXXX)
ns=mzbench-$$
pids=()
cleanup() {
  set +e
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null; done
  for p in "${pids[@]}"; do
    for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null
  done
  for p in $(ip netns pids "$ns" 2>/dev/null); do kill -KILL "$p" 2>/dev/null; done
  ip netns del "$ns" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

ip netns add "$ns"
ip -n "$ns" link set lo up
inns() { ip netns exec "$ns" "$@"; }

ep=http://127.0.0.1:2379
ip netns exec "$ns" etcd --name bench --data-dir "$work/etcd" \
  --listen-client-urls "$ep" --advertise-client-urls "$ep" \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster bench=http://127.0.0.1:2380 > "$work/etcd.log" 2>&1 &
pids+=($!)
ctl() { inns etcdctl --endpoints "$ep" "$@" >/dev/null; }
for _ in $(seq 100); do inns etcdctl --endpoints "$ep" endpoint health >/dev/null 2>&1 && break; sleep 0.1; done

node=bench
for i in 1 2 3 4 5 6; do
  ctl put "/nodes/$node/tunnels/t$i/enable" true
  ctl put "/nodes/$node/tunnels/t$i/kind" generic
  ctl put "/nodes/$node/tunnels/t$i/command" /bin/sleep
  ctl put "/nodes/$node/tunnels/t$i/args" "$((3600 + i * 100))"
done
ctl put /global/dns/upstreams/bench-a/addresses 127.0.0.1:5301
ctl put /global/dns/upstreams/bench-a/priority 1
ctl put /global/dns/upstreams/bench-b/addresses 127.0.0.1:5302
ctl put /global/dns/upstreams/bench-b/priority 2
ctl put /commit boot

# Not through `inns`: a backgrounded function is a subshell and $! would be its pid.
ip netns exec "$ns" env NODE_ID=$node ETCD_ENDPOINTS=$ep MEDUZA_ROOT="$work/root" MEDUZA_STATE_DIR="$work/state" \
  MEDUZA_DNS_LISTEN=127.0.0.1:53 MEDUZA_API_LISTEN=127.0.0.1:9100 MEDUZA_DATAPLANE=off \
  MEDUZA_LOG=info "$MEDUZA_BIN" run > "$work/meduza.log" 2>&1 &
mpid=$!; pids+=($mpid)

for _ in $(seq 200); do
  [[ -n $(inns etcdctl --endpoints "$ep" get "/updated/$node/applied" --print-value-only) ]] && break
  sleep 0.1
done
[[ $(pgrep -P "$mpid" -c sleep || true) == 6 ]] || { sleep 2; }
[[ $(pgrep -P "$mpid" -c sleep || true) == 6 ]] || { echo "meduza runs $(pgrep -P "$mpid" -c sleep) children" >&2; tail -30 "$work/meduza.log" >&2; exit 1; }

# --- 1. latency ---------------------------------------------------------------
latency() {
  inns python3 - "$1" "$COMMITS" "$node" <<'PY'
import base64, http.client, json, sys, time

mode, n, node = sys.argv[1], int(sys.argv[2]), sys.argv[3]
b64 = lambda s: base64.b64encode(s.encode()).decode()
unb64 = lambda s: base64.b64decode(s).decode()

put_conn = http.client.HTTPConnection("127.0.0.1", 2379)
def put(key, value):
    put_conn.request("POST", "/v3/kv/put", json.dumps({"key": b64(key), "value": b64(value)}),
                     {"Content-Type": "application/json"})
    return int(json.loads(put_conn.getresponse().read())["header"]["revision"])

watch = http.client.HTTPConnection("127.0.0.1", 2379, timeout=10)
watch.request("POST", "/v3/watch",
              json.dumps({"create_request": {"key": b64(f"/updated/{node}/applied")}}),
              {"Content-Type": "application/json"})
stream = watch.getresponse()
def wait_applied(rev, deadline):
    while time.monotonic() < deadline:
        line = stream.readline()
        if not line:
            raise SystemExit("watch stream closed")
        for ev in json.loads(line).get("result", {}).get("events", []) or []:
            value = unb64(ev["kv"].get("value", ""))
            if int(value.split(" ")[0]) >= rev:
                return
    raise SystemExit(f"revision {rev} not applied in time")
json.loads(stream.readline())  # the "created" message

samples = []
for i in range(n + 5):
    if mode == "dns":
        put("/global/dns/upstreams/bench-a/priority", "3" if i % 2 == 0 else "1")
    else:
        put(f"/nodes/{node}/tunnels/t1/args", str(3600 + i % 2))
    t0 = time.monotonic()
    rev = put("/commit", f"{mode}-{i}")
    wait_applied(rev, t0 + 10)
    if i >= 5:
        samples.append((time.monotonic() - t0) * 1000)
samples.sort()
q = lambda p: samples[min(len(samples) - 1, max(0, int(round(p * len(samples) + 0.5)) - 1))]
print(f"{mode} {len(samples)} {q(0.5):.1f} {q(0.99):.1f} {sum(samples) / len(samples):.1f} {samples[-1]:.1f}")
PY
}

echo "reconcile latency, commit -> applied, $COMMITS commits each ($(date -u +%Y-%m-%dT%H:%MZ), $(uname -r), $(nproc) CPUs)"
printf '%-10s %8s %9s %9s %9s %9s\n' change commits "p50 ms" "p99 ms" "mean ms" "max ms"
read -r _ n1 p50_dns p99_dns mean1 max1 < <(latency dns) || true
[[ -n ${p99_dns:-} ]] || { echo "dns latency run failed" >&2; tail -30 "$work/meduza.log" >&2; exit 1; }
printf '%-10s %8s %9s %9s %9s %9s\n' "dns" "$n1" "$p50_dns" "$p99_dns" "$mean1" "$max1"
read -r _ n2 p50_rs p99_rs mean2 max2 < <(latency restart) || true
[[ -n ${p99_rs:-} ]] || { echo "restart latency run failed" >&2; tail -30 "$work/meduza.log" >&2; exit 1; }
printf '%-10s %8s %9s %9s %9s %9s\n' "restart" "$n2" "$p50_rs" "$p99_rs" "$mean2" "$max2"
[[ $(pgrep -P "$mpid" -c sleep || true) == 6 ]] || { echo "children lost" >&2; exit 1; }

# --- 2. footprint -------------------------------------------------------------
{
  echo "[supervisord]"; echo "nodaemon=true"; echo "logfile=$work/supervisord.log"
  echo "pidfile=$work/supervisord.pid"; echo "childlogdir=$work"
  echo "[unix_http_server]"; echo "file=$work/supervisor.sock"
  echo "[rpcinterface:supervisor]"
  echo "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface"
  for i in 1 2 3 4 5 6; do echo "[program:svc$i]"; echo "command=/bin/sleep infinity"; done
} > "$work/supervisord.conf"
supervisord -c "$work/supervisord.conf" > "$work/supervisord.out" 2>&1 &
spid=$!; pids+=($spid)
sleep 5
[[ $(pgrep -P "$spid" -c sleep || true) == 6 ]] || { echo "supervisord runs $(pgrep -P "$spid" -c sleep) children" >&2; exit 1; }

# shellcheck source=proc-stats.sh
. "$here/tests/bench/proc-stats.sh"
m0=$(ticks "$mpid"); s0=$(ticks "$spid")
sleep "$DURATION"
m1=$(ticks "$mpid"); s1=$(ticks "$spid")
m_rss=$(rss "$mpid"); s_rss=$(rss "$spid"); m_pss=$(pss "$mpid"); s_pss=$(pss "$spid")
m_anon=$(anon "$mpid"); s_anon=$(anon "$spid"); m_file=$(file "$mpid"); s_file=$(file "$spid")
m_cpu=$(cpu_percent $((m1 - m0)) "$DURATION"); s_cpu=$(cpu_percent $((s1 - s0)) "$DURATION")

echo "footprint, 6 idle children, CPU over ${DURATION}s"
printf '%-14s %10s %10s %10s %10s %10s %12s\n' "" "RSS kB" "anon kB" "file kB" "PSS kB" "CPU %" "CPU ticks"
printf '%-14s %10s %10s %10s %10s %10s %12s\n' "meduza run" "$m_rss" "$m_anon" "$m_file" "$m_pss" "$m_cpu" "$((m1 - m0))"
printf '%-14s %10s %10s %10s %10s %10s %12s\n' "supervisord" "$s_rss" "$s_anon" "$s_file" "$s_pss" "$s_cpu" "$((s1 - s0))"
# Where meduza's resident pages are: Rss per mapped file (and anonymous), in kB.
echo "meduza run resident memory by mapping (kB):"
awk '/^[0-9a-f]+-[0-9a-f]+ / { name = (NF >= 6 ? $6 : "[anon]") }
     /^Rss:/ { rss[name] += $2 }
     END { for (n in rss) if (rss[n] > 0) printf "  %8d  %s\n", rss[n], n }' "/proc/$mpid/smaps" | sort -rn
printf 'binary: %s bytes\n' "$(stat -c %s "$MEDUZA_BIN")"
printf 'ratio meduza run/supervisord: RSS %s, PSS %s\n' "$(ratio "$m_rss" "$s_rss")" "$(ratio "$m_pss" "$s_pss")"

fail=0
awk -v p="$p99_dns" 'BEGIN { exit !(p < 100) }' || { echo "FAIL: p99 without a restart >= 100 ms" >&2; fail=1; }
awk -v a="$m_rss" -v b="$s_rss" 'BEGIN { exit !(a * 3 < b) }' || { echo "FAIL: meduza run RSS is not under a third of supervisord's" >&2; fail=1; }
awk -v c="$m_cpu" 'BEGIN { exit !(c < 0.5) }' || { echo "FAIL: meduza run idle CPU >= 0.5 %" >&2; fail=1; }
[[ $fail == 0 ]] && echo "targets met: p99 (no restart) < 100 ms, RSS < 1/3 of supervisord, idle CPU < 0.5 %"
exit $fail
