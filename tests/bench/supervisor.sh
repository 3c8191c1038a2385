#!/usr/bin/env bash
# Supervisor footprint: meduza's supervisor (`meduza supervise`) against supervisord
# (Debian `supervisor`), both running the same 6 idle children, in one run.
#
# Measures per supervisor process (children excluded):
#   RSS  = VmRSS from /proc/PID/status
#   PSS  = Pss from /proc/PID/smaps_rollup
#   CPU  = (utime+stime) delta from /proc/PID/stat over DURATION seconds, as % of one core
# Targets (issue): meduza RSS < 1/3 of supervisord's; meduza idle CPU < 0.5 %.
#
# Usage: tests/bench/supervisor.sh [DURATION_SECS]   (default 60; needs root for nothing)
# Env: MEDUZA_BIN (default: cargo build --release), CHILDREN (default 6),
#      PROBE_SECS (give each meduza service a `process` health probe every N s;
#      supervisord has no equivalent, so this only adds cost on meduza's side).
set -euo pipefail

DURATION=${1:-60}
CHILDREN=${CHILDREN:-6}
WARMUP=${WARMUP:-5}
here=$(cd "$(dirname "$0")/../.." && pwd)
command -v supervisord >/dev/null || { echo "supervisord missing (apt-get install supervisor)" >&2; exit 1; }

if [[ -z "${MEDUZA_BIN:-}" ]]; then
  (cd "$here" && cargo build --release --quiet --bin meduza)
  MEDUZA_BIN="${CARGO_TARGET_DIR:-$here/target}/release/meduza"
fi

work=$(mktemp -d /tmp/meduza-bench-sup.XXXXXX)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT

# The same children for both: idle `sleep infinity`.
{
  echo '['
  for i in $(seq "$CHILDREN"); do
    sep=','; [[ $i == "$CHILDREN" ]] && sep=''
    health=''
    if [[ -n "${PROBE_SECS:-}" ]]; then
      health=", \"health\": {\"probe\": {\"kind\": \"process\"}, \"interval_secs\": $PROBE_SECS, \"attempts\": 3, \"retry_delay_secs\": 5, \"grace_secs\": 1, \"timeout_secs\": 5}"
    fi
    echo "  {\"name\": \"svc$i\", \"argv\": [\"/bin/sleep\", \"infinity\"]$health}$sep"
  done
  echo ']'
} > "$work/services.json"

{
  echo "[supervisord]"
  echo "nodaemon=true"
  echo "logfile=$work/supervisord.log"
  echo "pidfile=$work/supervisord.pid"
  echo "childlogdir=$work"
  echo "[unix_http_server]"
  echo "file=$work/supervisor.sock"
  echo "[rpcinterface:supervisor]"
  echo "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface"
  for i in $(seq "$CHILDREN"); do
    echo "[program:svc$i]"
    echo "command=/bin/sleep infinity"
  done
} > "$work/supervisord.conf"

MEDUZA_STATE_DIR="$work/state" RUST_LOG=info "$MEDUZA_BIN" supervise --services "$work/services.json" \
  > "$work/meduza.log" 2>&1 &
pids+=($!); mpid=$!
supervisord -c "$work/supervisord.conf" > "$work/supervisord.out" 2>&1 &
pids+=($!); spid=$!

sleep "$WARMUP"
children() { pgrep -P "$1" -c sleep || true; }
[[ $(children "$mpid") == "$CHILDREN" ]] || { echo "meduza runs $(children "$mpid") children" >&2; cat "$work/meduza.log" >&2; exit 1; }
[[ $(children "$spid") == "$CHILDREN" ]] || { echo "supervisord runs $(children "$spid") children" >&2; exit 1; }

# shellcheck source=proc-stats.sh
. "$here/tests/bench/proc-stats.sh"

m0=$(ticks "$mpid"); s0=$(ticks "$spid")
sleep "$DURATION"
m1=$(ticks "$mpid"); s1=$(ticks "$spid")
m_rss=$(rss "$mpid"); s_rss=$(rss "$spid")
m_pss=$(pss "$mpid"); s_pss=$(pss "$spid")

m_cpu=$(cpu_percent $((m1 - m0)) "$DURATION"); s_cpu=$(cpu_percent $((s1 - s0)) "$DURATION")

echo "supervisor footprint, $CHILDREN idle children${PROBE_SECS:+ (meduza: process probe every ${PROBE_SECS}s each)}, CPU over ${DURATION}s ($(date -u +%Y-%m-%dT%H:%MZ), $(uname -r), $(nproc) CPUs)"
printf '%-14s %10s %10s %10s %12s\n' "" "RSS kB" "PSS kB" "CPU %" "CPU ticks"
printf '%-14s %10s %10s %10s %12s\n' "meduza" "$m_rss" "$m_pss" "$m_cpu" "$((m1 - m0))"
printf '%-14s %10s %10s %10s %12s\n' "supervisord" "$s_rss" "$s_pss" "$s_cpu" "$((s1 - s0))"
printf 'ratio meduza/supervisord: RSS %s, PSS %s\n' "$(ratio "$m_rss" "$s_rss")" "$(ratio "$m_pss" "$s_pss")"

fail=0
awk -v a="$m_rss" -v b="$s_rss" 'BEGIN { exit !(a * 3 < b) }' || { echo "FAIL: meduza RSS is not under a third of supervisord's" >&2; fail=1; }
awk -v c="$m_cpu" 'BEGIN { exit !(c < 0.5) }' || { echo "FAIL: meduza idle CPU >= 0.5 %" >&2; fail=1; }
[[ $fail == 0 ]] && echo "targets met: RSS < 1/3 of supervisord, idle CPU < 0.5 %"
exit $fail
