#!/usr/bin/env bash
# QEMU power-cut test (issue 13, "durable on power loss"): meduza's state on the
# gateway's state partition survives a hard cut, and after it the gateway comes up
# without etcd on its last good snapshot with its restart budgets intact.
#
# The guest is the boot test's image (tests/qemu/build-image.sh) with one more disk:
# an ext4 image labelled meduza-state (state-disk.sh), which meduza's boot duty
# mounts on /var/lib/meduza as on a gateway. From the host:
#   1. boot, provision from the host's etcd (as boot-test.sh), wait until
#      /updated/<id>/applied carries /commit's revision and both children run;
#      kill the tunnel child in the guest so the supervisor restarts it and writes
#      its restart budget (restart/tunnel-keepalive.state);
#   2. commit a change (a second tunnel) and, as soon as etcd shows it applied (a
#      watch, not a poll), reset the VM from QEMU's monitor (`system_reset`: no
#      shutdown, no unmount, the guest's RAM is gone), then kill the host's etcd;
#   3. the guest boots again in the same QEMU with the same disk and an unreachable
#      etcd; asserted: the kernel replayed the ext4 journal, meduza mounted the state
#      disk and logged that it applied the last good snapshot, the node API (token
#      from that snapshot) reports the second commit's revision as applied and its
#      three children running, DNS answers the snapshot's /dns/hosts/ record, the
#      restart budget file is byte-identical to the one before the cut and counted in
#      restarts_last_hour, no file in the state directory is empty;
#   4. clean poweroff, then from the host: e2fsck finds the file system clean,
#      last-good.json (read with debugfs) is valid JSON of the second revision.
# Prints FIGURE lines: applied → cut, and cut → kernel, journal replayed, last good
# snapshot applied, node API up, children running again (seconds, host clock).
#
#   tests/qemu/power-cut-test.sh [--no-build] [--keep]
#
# --no-build  reuse tests/qemu/build/ (scripts/test: boot-test.sh built it)
# --keep      keep the temporary directory (console log, state disk, etcd data)
#
# Environment (both unset in scripts/test):
#   MEDUZA_QEMU_SMP=N         vCPUs of the guest (default 1). With one, meduza's tokio
#                             runtime has one worker, which serialises the reconcile
#                             pass and the status publisher; a gateway has several.
#   MEDUZA_QEMU_STATE_IOPS=N  throttle the state disk to N requests a second (slow
#                             flash; state-disk.sh). MEDUZA_QEMU_SMP=2
#                             MEDUZA_QEMU_STATE_IOPS=4 widens the window between
#                             `applied` reaching etcd and the last good snapshot
#                             reaching the disk.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
. "$HERE/lib.sh"
# shellcheck source=state-disk.sh
. "$HERE/state-disk.sh"

parse_image_args "$@"

require_programs etcd etcdctl qemu-system-x86_64 dig jq python3 mkfifo curl dnsmasq \
	socat truncate mkfs.ext4 debugfs e2fsck
ensure_image

T_START="$(now)"
TMP="$(mktemp -d /tmp/meduza-powercut.XXXXXX)"
trap qemu_cleanup EXIT
trap 'exit 130' INT TERM

STATE=/var/lib/meduza
BUDGET="$STATE/restart/tunnel-keepalive.state"
DISK="$TMP/state.img"

start_host_side "$TMP"
seed_config
REV1="$COMMIT_REV"
make_state_disk "$DISK" 64
QEMU_EXTRA=()
QEMU_SMP="${MEDUZA_QEMU_SMP:-1}"
attach_state_disk "$DISK"
attach_monitor "$TMP/monitor.sock"
QEMU_ON_RESET=reboot
start_qemu "$TMP" ""
qlog "QEMU started (pid $QEMU_PID) with state disk $DISK; etcd 127.0.0.1:$ETCD_PORT, /commit revision $REV1"

# --- 1. first boot: provisioned from etcd, one restart recorded ---------------------
T="$(wait_for 120 "/updated/$NODE_ID/applied = $REV1" applied_is "$REV1")"
qlog "first boot: applied revision $REV1 at ${T}s"
console_has 'boot duty done.*state partition.*/dev/vda' ||
	qdie "meduza's boot duty did not mount the state disk (/dev/vda, LABEL=$STATE_DISK_LABEL)"
wait_for 60 "mihomo and tunnel-keepalive running (node API)" \
	services_running mihomo tunnel-keepalive >/dev/null

rc="$(run_in_guest KILL1 'kill $(pidof sleep)')"
[ "$rc" = 0 ] || qdie "could not kill the tunnel child (sleep) in the guest"
restarted() {
	api /v1/status | jq -e '.services[] | select(.name == "tunnel-keepalive")
		| .state == "running" and .restarts_last_hour >= 1'
}
wait_for 60 "tunnel-keepalive restarted by the supervisor" restarted >/dev/null
budget_before="$(guest_output BUDGET1 "cat $BUDGET")"
[ -n "$budget_before" ] || qdie "no restart budget in $BUDGET after the restart"
budget_lines="$(printf '%s\n' "$budget_before" | grep -c .)"
qlog "restart budget before the cut ($BUDGET): $(printf '%s' "$budget_before" | paste -sd'|')"

# --- 2. a new commit, cut right after it is applied --------------------------------------
# A second tunnel: after the reboot, three children show that the snapshot is the
# second commit's, not the first's.
e=("${ETCDCTL[@]}")
"${e[@]}" put "/nodes/$NODE_ID/tunnels/beacon/enable" "true" >/dev/null
"${e[@]}" put "/nodes/$NODE_ID/tunnels/beacon/kind" "generic" >/dev/null
"${e[@]}" put "/nodes/$NODE_ID/tunnels/beacon/role" "server" >/dev/null
"${e[@]}" put "/nodes/$NODE_ID/tunnels/beacon/command" "/bin/sleep" >/dev/null
"${e[@]}" put "/nodes/$NODE_ID/tunnels/beacon/args" "86401" >/dev/null
# A watch from the current revision on: no event can be missed, and the cut follows
# the status write within the watch's latency instead of a poll interval.
from_rev="$("${e[@]}" get /commit -w json | jq -r '.header.revision')"
exec {WATCH_FD}< <(exec "${e[@]}" watch --rev="$((from_rev + 1))" "/updated/$NODE_ID/applied")
WATCH_PID=$!
commit "power-cut test: second tunnel"
REV2="$COMMIT_REV"
deadline=$(($(date +%s) + 120))
seen=""
while [ -z "$seen" ]; do
	if IFS= read -r -t 1 line <&"$WATCH_FD"; then
		case "$line" in "$REV2 "*) seen=1 ;; esac
	fi
	[ -n "$seen" ] && break
	alive "$QEMU_PID" || qdie "QEMU exited while waiting for revision $REV2 to be applied"
	[ "$(date +%s)" -lt "$deadline" ] || qdie "revision $REV2 not applied within 120 s"
done
T_SEEN="$(now)"
CUT_OFFSET="$(stat -c %s "$CONSOLE")"
monitor system_reset
T_CUT="$(now)"
kill -9 "$ETCD_PID"
wait "$ETCD_PID" 2>/dev/null || true
ETCD_PID=""
kill "$WATCH_PID" 2>/dev/null || true
exec {WATCH_FD}<&-
WATCH_PID=""
APPLIED_TO_CUT_MS="$(awk -v a="$T_SEEN" -v b="$T_CUT" 'BEGIN { printf "%.0f", (b - a) * 1000 }')"
qlog "revision $REV2 applied; system_reset ${APPLIED_TO_CUT_MS} ms after etcd showed it; host etcd killed"

# --- 3. the reboot, without etcd ------------------------------------------------------
# From here wait_for reports seconds since the cut; console checks look only at what
# the guest printed after it.
QEMU_T0="$T_CUT"
after_cut() { tail -c +"$((CUT_OFFSET + 1))" "$CONSOLE" | sed 's/\x1b\[[0-9;]*m//g' | grep -Eq "$1"; }
T_INIT="$(wait_for 60 "kernel runs /init after the cut" after_cut 'Run /init as init process')"
T_REPLAY="$(wait_for 30 "ext4 journal replayed on the state disk" after_cut 'EXT4-fs \(vda\): recovery complete')"
wait_for 60 "meduza mounts the state disk again" after_cut 'boot duty done.*state partition.*/dev/vda' >/dev/null
T_LASTGOOD="$(wait_for 60 "meduza applies the last good snapshot" \
	after_cut 'etcd unreachable at boot; applying the last good snapshot')"
api_up() { [ "$(api_health_code)" = 200 ]; }
T_API="$(wait_for 60 "node API answers /v1/health" api_up)"
# The revision the last good snapshot carried, once its pass is done (the node API
# serves the token of the applied configuration, so it must be the snapshot's).
revision_applied() { api /v1/status | jq -e '.applied_revision != null'; }
wait_for 60 "a revision applied from the last good snapshot" revision_applied >/dev/null
came_up_on="$(api /v1/status | jq -r .applied_revision)"
[ "$came_up_on" = "$REV2" ] ||
	qdie "came up on revision $came_up_on, not $REV2 (etcd showed $REV2 applied before the cut)"
T_RUNNING="$(wait_for 90 "mihomo, tunnel-beacon and tunnel-keepalive running without etcd" \
	services_running mihomo tunnel-beacon tunnel-keepalive)"
qlog "after the cut: /init ${T_INIT}s, journal replayed ${T_REPLAY}s, last good applied ${T_LASTGOOD}s, API ${T_API}s, children running ${T_RUNNING}s"

status="$(api /v1/status)" || qdie "node API /v1/status failed after the reboot"
kept="$(jq -r '.services[] | select(.name == "tunnel-keepalive") | .restarts_last_hour' <<<"$status")"
[ "$kept" = "$budget_lines" ] ||
	qdie "tunnel-keepalive's restarts_last_hour is '$kept' after the reboot, want $budget_lines (the persisted budget)"
after_cut 'etcd unreachable at boot and no last good snapshot' &&
	qdie "meduza found no last good snapshot after the cut"
dns_answers() {
	[ "$(dig @127.0.0.1 -p "$DNS_PORT" gw.qemu.test A +short +time=2 +tries=1)" = "10.9.8.7" ]
}
wait_for 30 "DNS answers gw.qemu.test from the last good snapshot" dns_answers >/dev/null

budget_after="$(guest_output BUDGET2 "cat $BUDGET")"
[ "$budget_after" = "$budget_before" ] ||
	qdie "restart budget changed across the cut: before '$budget_before', after '$budget_after'"
empty="$(guest_output EMPTY "find $STATE -type f -size 0")"
[ -z "$empty" ] || qdie "zero-length files in the state directory after the cut: $empty"
leftovers="$(guest_output TEMPS "find $STATE -name '.*.meduza-tmp-*'")"
[ -z "$leftovers" ] || qlog "temp files left by writes the cut interrupted: $leftovers"
qlog "state directory after the cut: $(guest_output LS2 "find $STATE -type f | xargs ls -ln" | awk '{print $5, $9}' | paste -sd' ')"

# --- 4. clean poweroff; the disk read from the host -------------------------------------
poweroff_guest 90
fsck_out="$(disk_fsck "$DISK")" || qdie "e2fsck found problems on the state disk: $fsck_out"
last_good="$(disk_cat "$DISK" /last-good.json)"
[ "$(jq -r .revision <<<"$last_good")" = "$REV2" ] ||
	qdie "last-good.json on the disk is not revision $REV2: $(head -c 300 <<<"$last_good")"
[ "$(disk_cat "$DISK" /restart/tunnel-keepalive.state)" = "$budget_before" ] ||
	qdie "the restart budget on the disk differs from the one before the cut"
[ -n "$(disk_cat "$DISK" /clash-secret)" ] || qdie "clash-secret on the disk is empty"

echo "FIGURE qemu_power_cut_applied_to_cut_ms=$APPLIED_TO_CUT_MS"
echo "FIGURE qemu_power_cut_cut_to_init_s=$T_INIT"
echo "FIGURE qemu_power_cut_cut_to_journal_replayed_s=$T_REPLAY"
echo "FIGURE qemu_power_cut_cut_to_last_good_applied_s=$T_LASTGOOD"
echo "FIGURE qemu_power_cut_cut_to_api_s=$T_API"
echo "FIGURE qemu_power_cut_cut_to_running_s=$T_RUNNING"
echo "FIGURE qemu_power_cut_init_to_running_s=$(elapsed "$T_INIT" "$T_RUNNING")"
echo "FIGURE qemu_power_cut_wall_s=$(elapsed "$T_START" "$(now)")"
echo "qemu power-cut test: 1 passed, 0 failed"
