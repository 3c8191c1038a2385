#!/usr/bin/env bash
# QEMU boot test of the Meduza firmware (DESIGN §10): boots the test image
# (tests/qemu/build-image.sh) under software emulation, provisions it through
# the kernel command line (meduza.node_id=, meduza.etcd=) from a real etcd on
# the host, and checks from the host, against the DESIGN §4 status keys:
#   - /updated/<id>/online appears,
#   - /updated/<id>/applied carries /commit's revision,
#   - the DNS frontend answers a /dns/hosts/ record through the forwarded port,
#   - /updated/<id>/tproxy says "applied", and inside the guest the nft table
#     `inet meduza` exists with nft_tproxy/nft_socket loaded,
#   - a WireGuard instance committed on the running gateway becomes a *kernel*
#     device (the guest's Debian kernel has the module), configured over generic
#     netlink, that completes a handshake with wireguard-go in a namespace on the
#     host (lib.sh start_wg_host): /updated/<id>/wireguard/<name>/status = up,
#     `wg show` on both sides, ping through the tunnel both ways; a commit
#     without changes sends nothing to the device,
#   - the real mihomo (scripts/install-deps' cached build) runs:
#     /updated/<id>/clash/health is healthy, and in the guest its controller
#     answers GET /version with the image's mihomo version given the rendered
#     secret, 401 without it; its PROXY group uses the subscription's node-1 (a
#     second mihomo on the host's loopback) and a delay test through it passes,
#   - `poweroff` stops meduza's children and meduza before the kernel halts.
# Prints boot-to-/init and boot-to-applied times (QEMU start as zero) and the
# WireGuard commit-to-up time.
#
#   tests/qemu/boot-test.sh [--arch x86_64|aarch64] [--no-build] [--smoke] [--keep]
#
# --arch      the guest: x86_64 (default, q35) or aarch64 (virt, Cortex-A53), both
#             under software emulation; the same assertions, except that the aarch64
#             image runs the mihomo double (no arm64 mihomo here), so its proxy-node
#             pick and delay test through the node are not checked there
# --no-build  reuse tests/qemu/build/{vmlinuz,initrd.cpio.gz,mihomo-version}
# --smoke     only check the image: /init runs, the guest reaches the host's
#             etcd, `meduza --help` and `mihomo -v` run, the data-plane modules
#             load, clean poweroff (no `meduza run` assertions)
# --keep      keep the temporary directory (console log, etcd data)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
. "$HERE/lib.sh"

BUILD_IMAGE=1
SMOKE=0
KEEP=0
while [ $# -gt 0 ]; do
	case "$1" in
	--arch) qemu_arch "${2:-}"; shift ;;
	--no-build) BUILD_IMAGE=0 ;;
	--smoke) SMOKE=1 ;;
	--keep) KEEP=1 ;;
	*) qdie "unknown argument $1" ;;
	esac
	shift
done

require_programs etcd etcdctl "$QEMU_BIN" dig jq python3 mkfifo curl tac paste dnsmasq \
	ip wg wireguard-go socat busybox
if [ "$BUILD_IMAGE" = 1 ]; then
	"$HERE/build-image.sh" --arch "$QEMU_ARCH"
fi
[ -f "$QEMU_BUILD/vmlinuz" ] && [ -f "$QEMU_BUILD/initrd.cpio.gz" ] && [ -f "$QEMU_BUILD/mihomo-version" ] ||
	qdie "no image in $QEMU_BUILD (run tests/qemu/build-image.sh)"

TMP="$(mktemp -d /tmp/meduza-qemu.XXXXXX)"
trap qemu_cleanup EXIT
trap 'exit 130' INT TERM

start_host_side "$TMP"
seed_config
qlog "etcd on 127.0.0.1:$ETCD_PORT (guest: 10.0.2.2:$ETCD_PORT), /commit revision $COMMIT_REV"
WG_APPEND=""
if [ "$SMOKE" = 0 ]; then
	start_wg_host "$TMP"
	qlog "WireGuard peer: wireguard-go $WG_DEV in namespace $WG_NS, $WG_LINK_HOST:$WG_PORT"
fi

start_qemu "$TMP" "test.probe=10.0.2.2:$ETCD_PORT $WG_APPEND"
qlog "QEMU started (pid $QEMU_PID); DNS on 127.0.0.1:$DNS_PORT, API on 127.0.0.1:$API_PORT"

T_INIT="$(wait_for 60 "kernel runs /init" console_has 'Run /init as init process')"
qlog "boot-to-/init: ${T_INIT}s"
T_NET="$(wait_for 60 "guest reaches host etcd" console_has 'MEDUZA-TEST: probe .*etcdserver')"
qlog "guest fetched etcd /version from 10.0.2.2 at ${T_NET}s"
T_SHELL="$(wait_for 60 "rcS finished" console_has 'MEDUZA-TEST: rcS done')"

# The mihomo version build-image.sh put in the image (`mihomo -v` on the host).
mihomo_version="$(cat "$QEMU_BUILD/mihomo-version")"

if [ "$SMOKE" = 1 ]; then
	rc="$(run_in_guest HELP '/usr/bin/meduza --help >/dev/null 2>&1')"
	[ "$rc" = 0 ] || qdie "meduza --help failed in the guest (exit $rc)"
	rc="$(run_in_guest MIHOMOV "/usr/bin/mihomo -v | grep -q 'Mihomo Meta $mihomo_version '")"
	[ "$rc" = 0 ] || qdie "mihomo -v in the guest does not report $mihomo_version (exit $rc)"
	rc="$(run_in_guest MODS 'modprobe nft_tproxy && modprobe nft_socket && modprobe nft_fib_inet && modprobe wireguard && modprobe tun && modprobe veth')"
	[ "$rc" = 0 ] || qdie "data-plane modules did not load in the guest (exit $rc)"
	rc="$(run_in_guest NFT 'nft add table inet smoke && nft list tables | grep -q smoke && nft delete table inet smoke')"
	[ "$rc" = 0 ] || qdie "nft does not work in the guest (exit $rc)"
	poweroff_guest 60
	console_has 'meduza-stop' || qdie "shutdown did not run /etc/init.d/meduza-stop"
	echo "$QEMU_ARCH: boot-to-/init: ${T_INIT}s (TCG, QEMU start = 0); guest->host etcd at ${T_NET}s; rcS done at ${T_SHELL}s"
	echo "qemu smoke: 1 passed, 0 failed"
	exit 0
fi

# --- the gateway itself -----------------------------------------------------------
online() { [ "$(etcd_value "/updated/$NODE_ID/online")" = 1 ]; }
T_ONLINE="$(wait_for 120 "/updated/$NODE_ID/online = 1" online)"
qlog "online at ${T_ONLINE}s"

applied_current() {
	local v
	v="$(etcd_value "/updated/$NODE_ID/applied")"
	[ "${v%% *}" = "$COMMIT_REV" ]
}
T_APPLIED="$(wait_for 120 "/updated/$NODE_ID/applied = $COMMIT_REV ..." applied_current)"
qlog "applied /commit revision $COMMIT_REV at ${T_APPLIED}s (boot-to-applied)"
errors="$(etcd_value "/updated/$NODE_ID/errors")"
[ "$errors" = "[]" ] || qdie "/updated/$NODE_ID/errors is not empty: $errors"

dns_answers() {
	[ "$(dig @127.0.0.1 -p "$DNS_PORT" gw.qemu.test A +short +time=2 +tries=1)" = "10.9.8.7" ]
}
T_DNS="$(wait_for 60 "DNS frontend answers gw.qemu.test = 10.9.8.7" dns_answers)"
qlog "DNS answered through the forwarded port at ${T_DNS}s"
# A record added later reaches the frontend through the watch (no /commit).
"${ETCDCTL[@]}" put /dns/hosts/late.qemu.test 10.9.8.8 >/dev/null
late_answers() {
	[ "$(dig @127.0.0.1 -p "$DNS_PORT" late.qemu.test A +short +time=2 +tries=1)" = "10.9.8.8" ]
}
wait_for 30 "DNS frontend answers late.qemu.test = 10.9.8.8" late_answers >/dev/null

tproxy_applied() { etcd_value "/updated/$NODE_ID/tproxy" | grep -q '^applied '; }
T_TPROXY="$(wait_for 60 "/updated/$NODE_ID/tproxy = applied" tproxy_applied)"
qlog "TPROXY applied at ${T_TPROXY}s"
health="$(etcd_value "/updated/$NODE_ID/clash/health")"
case "$health" in
healthy*) ;;
*) qdie "/updated/$NODE_ID/clash/health is '$health', want healthy (mihomo's controller answering with the rendered secret)" ;;
esac

# The node's own status through the forwarded API port.
health="$(api_health_code)"
[ "$health" = 200 ] || qdie "node API /v1/health through the forwarded port returned '$health'"
T_RUNNING="$(wait_for 60 "mihomo and tunnel-keepalive running (node API)" services_running mihomo tunnel-keepalive)"
qlog "children running at ${T_RUNNING}s"
status="$(api /v1/status)" || qdie "node API /v1/status failed"
[ "$(jq -r .tproxy.state <<<"$status")" = applied ] ||
	qdie "node API status: tproxy is not applied: $(jq -c .tproxy <<<"$status")"
[ "$(jq -r .applied_revision <<<"$status")" = "$COMMIT_REV" ] ||
	qdie "node API status: applied_revision is not $COMMIT_REV: $(jq -c . <<<"$status")"

# Inside the guest, on its serial shell: the table, its modules, the policy rule,
# the hostname set by the boot duties.
rc="$(run_in_guest TABLE 'nft list table inet meduza | grep -q tproxy')"
[ "$rc" = 0 ] || qdie "nft table inet meduza with a tproxy rule is not present in the guest"
rc="$(run_in_guest MODS 'grep -q "^nft_tproxy " /proc/modules && grep -q "^nft_socket " /proc/modules')"
[ "$rc" = 0 ] || qdie "nft_tproxy/nft_socket are not loaded in the guest"
rc="$(run_in_guest RULE 'ip rule | grep -q "fwmark 0x1 lookup 100"')"
[ "$rc" = 0 ] || qdie "policy rule fwmark 0x1 lookup 100 missing in the guest"
rc="$(run_in_guest HOST '[ "$(hostname)" = "'"$NODE_ID"'" ]')"
[ "$rc" = 0 ] || qdie "hostname is not the node id (boot duties)"
# The real mihomo behind the controller meduza checks: GET /version with the secret
# of the rendered config reports the version build-image.sh put in the image; without
# the secret mihomo refuses (401). Its PROXY url-test group (the generator's default
# over the subscription) picked node-1, the host-side proxy node (lib.sh), and a
# delay test through node-1 to the health-check URL succeeds: the subscription was
# fetched and the proxy path guest mihomo -> node-1 works.
rc="$(run_in_guest MIHOMO "mihomo-get /version | grep -q '\"version\":\"$mihomo_version\"'")"
[ "$rc" = 0 ] || qdie "mihomo's controller in the guest did not report version $mihomo_version"
rc="$(run_in_guest NOSECRET 'mihomo-get --no-secret /version | grep -q "^HTTP/1.[01] 401"')"
[ "$rc" = 0 ] || qdie "mihomo's controller in the guest answered without the secret (want 401)"
if [ "$QEMU_ARCH" = x86_64 ]; then
	rc="$(run_in_guest PICK "mihomo-get /proxies/PROXY | grep -q '\"now\":\"node-1\"'")"
	[ "$rc" = 0 ] || qdie "mihomo's PROXY group in the guest does not use node-1 (subscription not loaded?)"
	rc="$(run_in_guest DELAY "mihomo-get '/proxies/node-1/delay?timeout=5000&url=$HEALTH_URL' | grep -q '\"delay\":[0-9]'")"
	[ "$rc" = 0 ] || qdie "a delay test through node-1 (the host's proxy node) failed in the guest"
fi
# The gateway's own resolver is the frontend (resolv_conf in the image's meduza.toml):
# rcS wrote QEMU's 10.0.2.3 there, meduza replaced it, and a lookup in the guest gets
# the etcd host record.
rc="$(run_in_guest RESOLV 'grep -qx "nameserver 127.0.0.1" /etc/resolv.conf && nslookup gw.qemu.test | grep -q 10.9.8.7')"
[ "$rc" = 0 ] || qdie "the guest's /etc/resolv.conf does not lead to the DNS frontend"

# --- kernel WireGuard ----------------------------------------------------------------
# An instance whose one peer is the host-side wireguard-go (lib.sh start_wg_host),
# committed on the running gateway. The guest's kernel has WireGuard, so AutoWg must
# create a kernel device and configure it over generic netlink; the image has no
# wireguard-go, so a wrong fallback to userspace fails the apply as well.
WG_NAME=host
WG_GUEST_DEV="wg-$WG_NAME"
wgk="/nodes/$NODE_ID/wireguard/$WG_NAME"
"${ETCDCTL[@]}" put "$wgk/enable" true >/dev/null
# shellcheck disable=SC2153 # WG_GUEST_KEY: set by start_wg_host (lib.sh)
"${ETCDCTL[@]}" put "$wgk/private_key" "$WG_GUEST_KEY" >/dev/null
"${ETCDCTL[@]}" put "$wgk/listen_port" "$WG_PORT" >/dev/null
"${ETCDCTL[@]}" put "$wgk/address" "$WG_TUN_GUEST/24" >/dev/null
"${ETCDCTL[@]}" put "$wgk/peer/hub/public_key" "$WG_HOST_PUB" >/dev/null
"${ETCDCTL[@]}" put "$wgk/peer/hub/endpoint" "$WG_LINK_HOST:$WG_PORT" >/dev/null
"${ETCDCTL[@]}" put "$wgk/peer/hub/allowed_ips" "$WG_TUN_HOST/32" >/dev/null
# A keepalive makes the kernel send a handshake as soon as the device is up
# (wg_open), without waiting for traffic.
"${ETCDCTL[@]}" put "$wgk/peer/hub/persistent_keepalive" 25 >/dev/null
t_commit="$(now)"
commit "qemu boot test: kernel wireguard"
# The first handshake as the host-side peer sees it (`wg show` there is cheap to
# poll, unlike etcdctl); meduza publishes the status on its next 5 s tick.
wg_handshake_seen() { wg_host wg show "$WG_DEV" latest-handshakes | awk '$2 > 0 { ok = 1 } END { exit !ok }'; }
(wait_for 60 "a handshake seen by the host-side peer" wg_handshake_seen >/dev/null) ||
	qdie "no handshake after the wireguard commit; /updated/$NODE_ID/errors: $(etcd_value "/updated/$NODE_ID/errors")"
T_WG_HANDSHAKE="$(elapsed "$t_commit" "$(now)")"
wait_for 60 "/updated/$NODE_ID/applied = $COMMIT_REV (wireguard commit)" applied_current >/dev/null
errors="$(etcd_value "/updated/$NODE_ID/errors")"
[ "$errors" = "[]" ] || qdie "/updated/$NODE_ID/errors after the wireguard commit: $errors"
wg_up() { etcd_value "/updated/$NODE_ID/wireguard/$WG_NAME/status" | grep -q '^up '; }
wait_for 60 "/updated/$NODE_ID/wireguard/$WG_NAME/status = up" wg_up >/dev/null
T_WG_UP="$(elapsed "$t_commit" "$(now)")"
qlog "wireguard: commit -> handshake ${T_WG_HANDSHAKE}s, commit -> status up ${T_WG_UP}s"

# A kernel device: the wireguard driver's device type, not a TUN device (which
# wireguard-go would have made), no UAPI socket, no wireguard-go process; the module
# loaded (by the boot duties).
wgdev="$(guest_output WGDEV "cat /sys/class/net/$WG_GUEST_DEV/uevent; [ -e /sys/class/net/$WG_GUEST_DEV/tun_flags ] && echo TUN-DEVICE; [ -e /var/run/wireguard/$WG_GUEST_DEV.sock ] && echo UAPI-SOCKET; pidof wireguard-go >/dev/null && echo WIREGUARD-GO; grep -o '^wireguard ' /proc/modules")"
grep -qx "DEVTYPE=wireguard" <<<"$wgdev" ||
	qdie "$WG_GUEST_DEV in the guest is not a kernel WireGuard device: $(paste -sd' ' <<<"$wgdev")"
! grep -Eqx "TUN-DEVICE|UAPI-SOCKET|WIREGUARD-GO" <<<"$wgdev" ||
	qdie "$WG_GUEST_DEV in the guest is served by a userspace implementation: $(paste -sd' ' <<<"$wgdev")"
grep -qx "wireguard " <<<"$wgdev" || qdie "the wireguard module is not loaded in the guest"
! console_has 'kernel wireguard unavailable' || qdie "meduza fell back from kernel WireGuard"

# What the kernel holds, read with wg (a second client of the generic netlink
# family): the public key of the private key meduza sent, the port, the peer with
# its endpoint, allowed IPs and keepalive, and a handshake.
dump="$(guest_output WGSHOW "wg show $WG_GUEST_DEV dump | awk 'NR == 1 { print \"dev\", \$2, \$3; next } { print \"peer\", \$1, \$3, \$4, \$5, \$8 }'")"
[ "$(sed -n 's/^dev //p' <<<"$dump")" = "$WG_GUEST_PUB $WG_PORT" ] ||
	qdie "guest device: want public key $WG_GUEST_PUB and port $WG_PORT, wg show says: $dump"
read -r g_peer g_endpoint g_allowed g_handshake g_keepalive <<<"$(sed -n 's/^peer //p' <<<"$dump")"
[ "$g_peer $g_endpoint $g_allowed $g_keepalive" = "$WG_HOST_PUB $WG_LINK_HOST:$WG_PORT $WG_TUN_HOST/32 25" ] ||
	qdie "guest peer differs from the etcd keys, wg show says: $dump"
[ "${g_handshake:-0}" -gt 0 ] || qdie "guest: no handshake with the host-side peer: $dump"
read -r _ _ h_endpoint _ h_handshake _ <<<"$(wg_host wg show "$WG_DEV" dump | sed -n 2p)"
[ "$h_endpoint" = "$WG_LINK_GUEST:$WG_PORT" ] ||
	qdie "host-side peer learnt endpoint '$h_endpoint', want $WG_LINK_GUEST:$WG_PORT"
[ "${h_handshake:-0}" -gt 0 ] || qdie "host side: no handshake with the guest"
rc="$(run_in_guest WGADDR "ip -4 addr show $WG_GUEST_DEV | grep -q 'inet $WG_TUN_GUEST/24'")"
[ "$rc" = 0 ] || qdie "$WG_GUEST_DEV in the guest does not have $WG_TUN_GUEST/24"
rc="$(run_in_guest WGPING "ping -c 1 -W 5 $WG_TUN_HOST >/dev/null")"
[ "$rc" = 0 ] || qdie "guest cannot ping the host-side peer $WG_TUN_HOST through the tunnel"
wg_host busybox ping -c 1 -W 5 "$WG_TUN_GUEST" >/dev/null ||
	qdie "host-side peer cannot ping the guest $WG_TUN_GUEST through the tunnel"

# Converged: a commit without changes reads the device back and sends nothing (the
# plan compares the kernel's own report with the keys; a field read back wrong would
# upsert the peer again on every pass).
commit "qemu boot test: no change"
wait_for 60 "/updated/$NODE_ID/applied = $COMMIT_REV (unchanged commit)" applied_current >/dev/null
sed 's/\x1b\[[0-9;]*m//g; s/\r$//' "$CONSOLE" | grep -o 'report=WgDeviceReport {[^}]*}' > "$TMP/wg-reports.txt" || true
[ "$(grep -c . "$TMP/wg-reports.txt")" -ge 2 ] || qdie "fewer than two wireguard apply reports on the console"
[ "$(grep -c 'created: true' "$TMP/wg-reports.txt")" = 1 ] ||
	qdie "$WG_GUEST_DEV was created more than once: $(cat "$TMP/wg-reports.txt")"
tail -n 1 "$TMP/wg-reports.txt" |
	grep -q 'created: false, peers_upserted: 0, peers_removed: 0, key_or_port_set: false, link_changed: false' ||
	qdie "an unchanged commit changed $WG_GUEST_DEV: $(tail -n 1 "$TMP/wg-reports.txt")"

# A steady state: the data plane found its table as planned on every check since
# (a listing that never matches the plan re-applies it every second).
drift="$(grep -c 'tproxy drift repaired' "$CONSOLE" || true)"
[ "$drift" = 0 ] || qdie "the data plane re-applied its table $drift times without any change"

# --- orderly shutdown ---------------------------------------------------------------
poweroff_guest 90
console_has 'meduza-stop: stopping meduza' || qdie "shutdown did not signal meduza"
console_has 'meduza-stop: meduza exited' || qdie "meduza did not exit within meduza-stop's timeout"
# meduza's log on the console, without colours: the first start of each service,
# the stops after "stopping all services", then "meduza stopped".
plain="$TMP/console.txt"
sed 's/\x1b\[[0-9;]*m//g; s/\r$//' "$CONSOLE" > "$plain"
started="$(sed -n 's/.*service started svc=\([^ ]*\).*/\1/p' "$plain" | awk '!seen[$0]++' | tac | paste -sd' ')"
stopping_line="$(grep -n 'stopping all services' "$plain" | tail -n1 | cut -d: -f1)"
[ -n "$stopping_line" ] || qdie "meduza did not log 'stopping all services'"
stopped="$(tail -n +"$stopping_line" "$plain" | sed -n 's/.*service stopped svc=\([^ ]*\).*/\1/p' | paste -sd' ')"
[ -n "$started" ] || qdie "no 'service started' lines on the console"
[ "$stopped" = "$started" ] ||
	qdie "children stopped in order '$stopped', want reverse start order '$started'"
last_stop="$(grep -n 'service stopped' "$plain" | tail -n1 | cut -d: -f1)"
meduza_stopped="$(grep -n 'meduza stopped' "$plain" | tail -n1 | cut -d: -f1)"
[ -n "$meduza_stopped" ] || qdie "meduza did not log 'meduza stopped'"
[ "$last_stop" -lt "$meduza_stopped" ] || qdie "'meduza stopped' before the last child stopped"
qlog "children stopped in reverse start order: $stopped; then 'meduza stopped'"
status="$(etcd_value "/updated/$NODE_ID/services/mihomo/status")"
case "$status" in
stopped*) ;;
*) qdie "/updated/$NODE_ID/services/mihomo/status after poweroff is '$status', want stopped" ;;
esac
tproxy="$(etcd_value "/updated/$NODE_ID/tproxy")"
case "$tproxy" in
removed*) ;;
*) qdie "/updated/$NODE_ID/tproxy after poweroff is '$tproxy', want removed" ;;
esac
[ -z "$(etcd_value "/updated/$NODE_ID/online")" ] ||
	qdie "/updated/$NODE_ID/online still present after an orderly stop (lease not revoked)"

echo "$QEMU_ARCH: boot-to-/init: ${T_INIT}s; online: ${T_ONLINE}s; boot-to-applied: ${T_APPLIED}s; DNS: ${T_DNS}s; TPROXY: ${T_TPROXY}s (TCG, QEMU start = 0)"
echo "kernel WireGuard: commit -> handshake ${T_WG_HANDSHAKE}s, commit -> status up ${T_WG_UP}s (status published every 5 s)"
echo "qemu boot test: 1 passed, 0 failed"
