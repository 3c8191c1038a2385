#!/usr/bin/env bash
# QEMU watchdog test (issue 15): a frozen meduza resets the gateway, which comes back
# provisioned; a clean poweroff does not reset it.
#
# The guest is the boot test's image (tests/qemu/build-image.sh) with QEMU's i6300ESB
# watchdog (`-device i6300esb -action watchdog=reset`). The image's meduza.toml arms
# /dev/watchdog with a 30 s timeout; S01watchdog (overlay/) tries the i6300esb driver
# and falls back to softdog. Debian's cloud kernel the image is built from has no
# i6300esb driver (CONFIG_I6300ESB_WDT is not set), so with that kernel the device is
# softdog; MEDUZA_QEMU_KERNEL=amd64 runs the same test on an image with Debian's generic
# kernel (build-image.sh with the same variable builds it into build/generic/), where
# S01watchdog loads i6300esb and the test requires it to be the armed device. The test
# prints which one meduza armed. From the host:
#   1. boot and provision from the host's etcd (as boot-test.sh); meduza logged
#      `watchdog armed` with the device's identity and timeout;
#   2. `kill -STOP` meduza in the guest: nothing pets the watchdog any more. Asserted:
#      the guest resets (softdog's `Initiating system reboot`, or with the i6300ESB
#      directly SeaBIOS's banner of a new boot in the same QEMU) no earlier than two thirds of the timeout after the freeze
#      (meduza pets every third) and no later than the timeout plus 5 s; after the
#      reset meduza arms the watchdog again, publishes `applied` anew with /commit's
#      revision, and the node API reports it with both children running;
#   3. clean `poweroff`: meduza disarms the watchdog (magic close, `watchdog disarmed`),
#      the kernel reports no unexpected close, and QEMU exits (a reset would boot the
#      guest again in the same QEMU instead: QEMU_ON_RESET=reboot).
# Prints FIGURE lines: freeze → reset (the watchdog's reset time), freeze → /init and
# freeze → applied again (seconds, host clock).
#
#   tests/qemu/watchdog-test.sh [--no-build] [--keep]
#
# --no-build  reuse tests/qemu/build/ (scripts/test: boot-test.sh built it)
# --keep      keep the temporary directory (console log, etcd data)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
. "$HERE/lib.sh"

parse_image_args "$@"

require_programs etcd etcdctl qemu-system-x86_64 jq python3 mkfifo curl dnsmasq
ensure_image

T_START="$(now)"
TMP="$(mktemp -d /tmp/meduza-watchdog.XXXXXX)"
trap qemu_cleanup EXIT
trap 'exit 130' INT TERM

start_host_side "$TMP"
seed_config
REV="$COMMIT_REV"
QEMU_EXTRA=(-device i6300esb -action watchdog=reset)
QEMU_ON_RESET=reboot
start_qemu "$TMP" ""
qlog "QEMU started (pid $QEMU_PID) with an i6300ESB; etcd 127.0.0.1:$ETCD_PORT, /commit revision $REV"

# Console lines printed after byte offset $FROM, without ANSI colours.
FROM=0
since() { tail -c +"$((FROM + 1))" "$CONSOLE" | sed 's/\x1b\[[0-9;]*m//g'; }
since_has() { since | grep -Eq "$1"; }

# --- 1. first boot: provisioned, watchdog armed ------------------------------------------
T="$(wait_for 120 "/updated/$NODE_ID/applied = $REV" applied_is "$REV")"
qlog "first boot: applied revision $REV at ${T}s"
wait_for 30 "meduza arms the watchdog" since_has 'watchdog armed' >/dev/null
armed="$(since | grep 'watchdog armed' | first)"
TIMEOUT="$(sed -n 's/.*timeout_s=\([0-9]*\).*/\1/p' <<<"$armed")"
IDENTITY="$(sed -n 's/.*identity="\{0,1\}\([^"]*\)"\{0,1\}.*/\1/p' <<<"$armed")"
[ -n "$TIMEOUT" ] || qdie "no timeout in meduza's 'watchdog armed' line: $armed"
DRIVER="$(since | sed -n 's/.*S01watchdog: \/dev\/watchdog from \([A-Za-z0-9_]*\).*/\1/p' | first)"
qlog "watchdog: driver ${DRIVER:-built in}, identity '$IDENTITY', timeout ${TIMEOUT}s"
if [ "${MEDUZA_QEMU_KERNEL:-}" = amd64 ]; then
	[ "$DRIVER" = i6300esb ] || qdie "the generic kernel's image armed '${DRIVER:-?}', not QEMU's i6300ESB"
fi
wait_for 60 "mihomo and tunnel-keepalive running (node API)" \
	services_running mihomo tunnel-keepalive >/dev/null
applied_before="$(etcd_value "/updated/$NODE_ID/applied")"
# Booting and provisioning under TCG must not have cost a pet.
since_has 'watchdog pet withheld' &&
	qdie "meduza withheld a pet while healthy: $(since | grep 'watchdog pet withheld' | first)"

# --- 2. freeze meduza: the watchdog resets the VM ----------------------------------------
rc="$(run_in_guest PID 'pidof meduza >/dev/null')"
[ "$rc" = 0 ] || qdie "no meduza process in the guest"
FROM="$(stat -c %s "$CONSOLE")"
send 'kill -STOP $(pidof meduza)'
T_FREEZE="$(now)"
QEMU_T0="$T_FREEZE"
# The reset itself: softdog says so before it resets; after any reset the firmware
# (SeaBIOS) prints its banner at once, while the kernel's first line comes seconds
# later (option ROMs, loading the kernel and initramfs under TCG).
T_RESET="$(wait_for $((TIMEOUT + 30)) "the watchdog resets the guest" \
	since_has 'Initiating system reboot|SeaBIOS')"
T_INIT="$(wait_for 60 "the guest boots again (/init)" since_has 'Run /init as init process')"
since_has 'Initiating system reboot' &&
	qlog "guest kernel: $(since | grep -o 'softdog: Initiating system reboot' | first)"
min="$(awk -v t="$TIMEOUT" 'BEGIN { printf "%.2f", t * 2 / 3 - 1 }')"
max="$((TIMEOUT + 5))"
awk -v r="$T_RESET" -v lo="$min" -v hi="$max" 'BEGIN { exit !(r >= lo && r <= hi) }' ||
	qdie "reset ${T_RESET}s after the freeze, want between ${min}s and ${max}s (timeout ${TIMEOUT}s, pets every third)"
qlog "reset ${T_RESET}s after the freeze (timeout ${TIMEOUT}s); /init at ${T_INIT}s"

# Provisioned again: a new meduza arms the watchdog and publishes `applied` anew.
wait_for 60 "meduza arms the watchdog after the reset" since_has 'watchdog armed' >/dev/null
reapplied() {
	local v
	v="$(etcd_value "/updated/$NODE_ID/applied")"
	[ "${v%% *}" = "$REV" ] && [ "$v" != "$applied_before" ]
}
T_APPLIED="$(wait_for 120 "applied = $REV published again after the reset" reapplied)"
wait_for 60 "mihomo and tunnel-keepalive running after the reset" \
	services_running mihomo tunnel-keepalive >/dev/null
came_up_on="$(api /v1/status | jq -r .applied_revision)"
[ "$came_up_on" = "$REV" ] || qdie "node API reports revision $came_up_on after the reset, not $REV"
resets="$(grep -c 'Run /init as init process' "$CONSOLE")"
[ "$resets" = 2 ] || qdie "$resets boots on the console after one freeze, want 2"
qlog "after the reset: applied $REV again at ${T_APPLIED}s after the freeze"

# --- 3. clean poweroff: disarmed, no reset --------------------------------------------------
FROM="$(stat -c %s "$CONSOLE")"
T_OFF="$(now)"
poweroff_guest 90
T_OFF_DONE="$(elapsed "$T_OFF" "$(now)")"
since_has 'watchdog disarmed' || qdie "meduza did not log 'watchdog disarmed' on poweroff"
since_has 'watchdog did not stop|Unexpected close' &&
	qdie "the kernel saw the watchdog closed without the magic character"
since_has 'Initiating system reboot|SeaBIOS|Linux version|Run /init' &&
	qdie "the guest reset during poweroff"
since_has 'meduza stopped' || qdie "meduza did not log 'meduza stopped' on poweroff"
qlog "poweroff: watchdog disarmed, QEMU exited after ${T_OFF_DONE}s, no reset"

echo "FIGURE qemu_watchdog_timeout_s=$TIMEOUT"
echo "FIGURE qemu_watchdog_freeze_to_reset_s=$T_RESET"
echo "FIGURE qemu_watchdog_freeze_to_init_s=$T_INIT"
echo "FIGURE qemu_watchdog_freeze_to_applied_s=$T_APPLIED"
echo "FIGURE qemu_watchdog_poweroff_s=$T_OFF_DONE"
echo "FIGURE qemu_watchdog_wall_s=$(elapsed "$T_START" "$(now)")"
echo "qemu watchdog test: 1 passed, 0 failed (device: ${IDENTITY:-unknown}${DRIVER:+, module $DRIVER})"
