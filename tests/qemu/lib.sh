# shellcheck shell=bash
# Shared helpers of tests/qemu/boot-test.sh, power-cut-test.sh and run-demo.sh
# (sourced).
# Host side of the QEMU setup: a real etcd on loopback (QEMU user networking
# maps the guest's 10.0.2.2 to the host's 127.0.0.1), a proxy node, a
# subscription server, a DNS upstream, the example node configuration, and QEMU
# itself. Nothing here sends traffic beyond the host's loopback.

QEMU_HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# MIHOMO_BIN: the real mihomo scripts/install-deps caches (the image's, and the
# host-side proxy node's).
# shellcheck source=SCRIPTDIR/../../scripts/mihomo-path
. "$QEMU_HERE/../../scripts/mihomo-path"
# The guest's architecture (MEDUZA_QEMU_ARCH, or a script's --arch): x86_64 (default)
# or aarch64. The image build-image.sh made for it: aarch64 in build/aarch64/; x86_64
# for MEDUZA_QEMU_KERNEL (cloud-amd64 by default; amd64 is Debian's generic kernel, in
# build/generic/).
QEMU_ARCH="${MEDUZA_QEMU_ARCH:-x86_64}"
# qemu_arch ARCH: select the guest architecture (sets QEMU_ARCH, QEMU_BUILD, QEMU_BIN).
qemu_arch() {
	QEMU_ARCH="$1"
	case "$QEMU_ARCH" in
	x86_64)
		QEMU_BIN=qemu-system-x86_64
		case "${MEDUZA_QEMU_KERNEL:-cloud-amd64}" in
		amd64) QEMU_BUILD="$QEMU_HERE/build/generic" ;;
		*) QEMU_BUILD="$QEMU_HERE/build" ;;
		esac
		;;
	aarch64)
		QEMU_BIN=qemu-system-aarch64
		QEMU_BUILD="$QEMU_HERE/build/aarch64"
		;;
	*) qdie "the guest architecture must be x86_64 or aarch64, not '$QEMU_ARCH'" ;;
	esac
}
NODE_ID="${NODE_ID:-qemu1}"
# The node API token the test node gets (/nodes/<id>/api/token, >= 16 chars).
API_TOKEN="qemu-test-api-token-0001"

qlog() { printf '[qemu] %s\n' "$*" >&2; }
qdie() { printf '[qemu] FAIL: %s\n' "$*" >&2; exit 1; }
# The first line of stdin. Reads all of it: `grep -m1` or `head -n1` would close the
# pipe early, and under `set -o pipefail` the writer's SIGPIPE (exit 141) fails the test.
first() { awk 'NR == 1'; }
qemu_arch "$QEMU_ARCH"

# Programs the test needs; a missing one is a failure, not a skip
# (scripts/test installs them: etcd-server etcd-client qemu-system-x86 dnsutils jq
# dnsmasq-base).
require_programs() {
	local p missing=""
	for p in "$@"; do
		command -v "$p" >/dev/null 2>&1 || missing="$missing $p"
	done
	[ -z "$missing" ] || qdie "missing programs:$missing"
}

free_port() {
	python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", b - a }'; }

# wait_ready WHAT PID LOG CMD...: run CMD every 0.1 s until it succeeds, for 10 s at
# most; if PID exits first, show LOG. Either failure names WHAT.
wait_ready() {
	local what=$1 pid=$2 log=$3
	shift 3
	for _ in $(seq 1 100); do
		"$@" >/dev/null 2>&1 && return 0
		kill -0 "$pid" 2>/dev/null || { cat "$log" >&2; qdie "$what exited"; }
		sleep 0.1
	done
	qdie "$what was not ready within 10 s"
}

# tcp_open PORT: something accepts TCP connections on 127.0.0.1:PORT.
tcp_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# parse_image_args ARGS... -> sets BUILD_IMAGE, KEEP: the two flags of the tests that
# boot the x86_64 image (--no-build reuses tests/qemu/build/, --keep keeps the
# temporary directory).
parse_image_args() {
	BUILD_IMAGE=1
	KEEP=0
	for a in "$@"; do
		case "$a" in
		--no-build) BUILD_IMAGE=0 ;;
		--keep) KEEP=1 ;;
		*) qdie "unknown argument $a" ;;
		esac
	done
}

# ensure_image: build the image unless --no-build, then check that it is there.
ensure_image() {
	if [ "$BUILD_IMAGE" = 1 ]; then
		"$HERE/build-image.sh"
	fi
	[ -f "$QEMU_BUILD/vmlinuz" ] && [ -f "$QEMU_BUILD/initrd.cpio.gz" ] ||
		qdie "no image in $QEMU_BUILD (run tests/qemu/build-image.sh)"
}

# start_host_side DIR: what the guest reaches on the host (etcd, the proxy node, the
# subscription server, the DNS upstream), in the order they need each other.
start_host_side() {
	start_etcd "$1"
	start_proxy_node "$1"
	start_subscription_server "$1"
	start_dns_upstream "$1"
}

# start_etcd DIR -> sets ETCD_PORT, ETCD_PID, ETCDCTL (array)
start_etcd() {
	local dir="$1" peer
	ETCD_PORT="$(free_port)"
	peer="$(free_port)"
	etcd --name qemu-test --data-dir "$dir/etcd" \
		--listen-client-urls "http://127.0.0.1:$ETCD_PORT" \
		--advertise-client-urls "http://127.0.0.1:$ETCD_PORT" \
		--listen-peer-urls "http://127.0.0.1:$peer" \
		--initial-advertise-peer-urls "http://127.0.0.1:$peer" \
		--initial-cluster "qemu-test=http://127.0.0.1:$peer" \
		> "$dir/etcd.log" 2>&1 &
	ETCD_PID=$!
	ETCDCTL=(env ETCDCTL_API=3 etcdctl --endpoints "http://127.0.0.1:$ETCD_PORT")
	wait_ready "etcd on 127.0.0.1:$ETCD_PORT" "$ETCD_PID" "$dir/etcd.log" "${ETCDCTL[@]}" endpoint health
}

# start_proxy_node DIR -> sets NODE_PORT, NODE_PID. The subscription's one proxy
# node: a second real mihomo on the host's loopback, SOCKS5 on its mixed port (the
# guest reaches it at 10.0.2.2:$NODE_PORT). It passes connections to the host's
# loopback only (the subscription server, which is also the health-check target)
# and rejects everything else, so the guest's mihomo has a live node to pick and
# nothing leaves this machine through it.
start_proxy_node() {
	local dir="$1/proxy-node"
	mkdir -p "$dir"
	NODE_PORT="$(free_port)"
	cat > "$dir/config.yaml" <<YAML
mixed-port: $NODE_PORT
allow-lan: false
mode: rule
log-level: info
ipv6: false
dns:
  enable: false
rules:
  - IP-CIDR,127.0.0.0/8,DIRECT,no-resolve
  - MATCH,REJECT
YAML
	"${MEDUZA_TEST_MIHOMO:-$MIHOMO_BIN}" -d "$dir" -f "$dir/config.yaml" > "$1/proxy-node.log" 2>&1 &
	NODE_PID=$!
	wait_ready "proxy node (mihomo) on 127.0.0.1:$NODE_PORT" "$NODE_PID" "$1/proxy-node.log" tcp_open "$NODE_PORT"
}

# start_subscription_server DIR -> sets SUB_PORT, SUB_PID, HEALTH_URL. Serves a
# minimal Clash subscription (only `proxies`, which is all a proxy provider reads:
# start_proxy_node's node as node-1) and the health-check target HEALTH_URL. The
# guest's mihomo asks node-1 for HEALTH_URL, so its host is the loopback as the
# proxy node sees it.
start_subscription_server() {
	local dir="$1/www"
	[ -n "${NODE_PORT:-}" ] || qdie "start_subscription_server: start_proxy_node first"
	mkdir -p "$dir"
	cat > "$dir/sub.yaml" <<YAML
proxies:
  - name: node-1
    type: socks5
    server: 10.0.2.2
    port: $NODE_PORT
YAML
	: > "$dir/generate_204"
	SUB_PORT="$(free_port)"
	# HTTP/1.1 keeps the connection open: mihomo's delay test (`unified-delay`) sends
	# its second HEAD on the same connection.
	python3 -m http.server --protocol HTTP/1.1 --bind 127.0.0.1 --directory "$dir" "$SUB_PORT" \
		> "$1/http.log" 2>&1 &
	SUB_PID=$!
	HEALTH_URL="http://127.0.0.1:$SUB_PORT/generate_204"
}

# start_dns_upstream DIR -> sets UPSTREAM_PORT, UPSTREAM_PID. A DNS server on the
# host's loopback (dnsmasq answering every A query with 10.9.9.9), the test
# node's only upstream group: without one, the node's upstreams default to
# public resolvers, which the DNS frontend's health checks and mihomo's DNS
# (its nameserver list is the node's upstreams) would then query through QEMU's
# user networking. The tests must not send traffic off this machine.
start_dns_upstream() {
	UPSTREAM_PORT="$(free_port)"
	dnsmasq --keep-in-foreground --pid-file= --no-resolv --no-hosts --bind-interfaces \
		--listen-address=127.0.0.1 --port="$UPSTREAM_PORT" --address=/#/10.9.9.9 \
		--log-queries --log-facility=- > "$1/dnsmasq.log" 2>&1 &
	UPSTREAM_PID=$!
}

# The boot test's WireGuard link (start_wg_host): the guest's second NIC and the
# host-side peer's tap share 10.77.0.0/24; the tunnel itself carries 10.78.0.0/24.
WG_LINK_HOST=10.77.0.1
WG_LINK_GUEST=10.77.0.2
WG_TUN_HOST=10.78.0.1
WG_TUN_GUEST=10.78.0.2
WG_PORT=51820

# start_wg_host DIR -> sets WG_NS, WG_DEV, WG_BRIDGE_PID, WG_GO_PID, WG_HOST_PUB,
# WG_GUEST_KEY, WG_GUEST_PUB, WG_APPEND, and adds the guest's second NIC to
# QEMU_EXTRA (call before start_qemu; pass WG_APPEND to it).
#
# The far end of the guest's kernel WireGuard device: wireguard-go (userspace, as
# this host's kernel has no WireGuard) in a network namespace of its own, so the
# host's own network configuration is never touched. The guest reaches that
# namespace over a second virtio NIC, not over QEMU's user networking (whose
# UDP port forwards end on the host's loopback, which a namespace cannot see):
# QEMU sends that NIC's Ethernet frames as datagrams to a Unix socket
# (`-netdev dgram`, QEMU >= 7.2), where socat, started inside the namespace,
# writes them to a tap device and sends the tap's frames back. Unix socket paths
# are in the file system, shared by all namespaces. The peer has no endpoint: it
# learns the guest's from the guest's first handshake, as a hub does.
start_wg_host() {
	local dir="$1/wg"
	mkdir -p "$dir"
	WG_NS="meduza-qemu-wg-$$"
	# wireguard-go's UAPI socket (/var/run/wireguard/<dev>.sock) is global: the name
	# must not collide with another test's device.
	WG_DEV="mdzwg$$"
	ip netns add "$WG_NS"
	ip -n "$WG_NS" link set lo up
	# No IPv6 in the namespace: the tap then sends nothing on its own (no router
	# solicitation, no DAD), so socat never sends before QEMU's socket exists
	# (socat exits on a failed send).
	ip netns exec "$WG_NS" sysctl -qw net.ipv6.conf.all.disable_ipv6=1 \
		net.ipv6.conf.default.disable_ipv6=1
	ip netns exec "$WG_NS" socat "UNIX-SENDTO:$dir/qemu.sock,bind=$dir/ns.sock" \
		"TUN:$WG_LINK_HOST/24,tun-type=tap,tun-name=wgtap,iff-up,iff-no-pi" \
		> "$1/wg-bridge.log" 2>&1 &
	WG_BRIDGE_PID=$!
	ip netns exec "$WG_NS" wireguard-go -f "$WG_DEV" > "$1/wireguard-go.log" 2>&1 &
	WG_GO_PID=$!
	for _ in $(seq 1 100); do
		[ -S "/var/run/wireguard/$WG_DEV.sock" ] && ip -n "$WG_NS" link show wgtap >/dev/null 2>&1 && break
		kill -0 "$WG_BRIDGE_PID" 2>/dev/null || { cat "$1/wg-bridge.log" >&2; qdie "socat (tap bridge) exited"; }
		kill -0 "$WG_GO_PID" 2>/dev/null || { cat "$1/wireguard-go.log" >&2; qdie "wireguard-go exited"; }
		sleep 0.1
	done
	[ -S "/var/run/wireguard/$WG_DEV.sock" ] || qdie "wireguard-go did not create its UAPI socket within 10 s"
	ip -n "$WG_NS" link show wgtap >/dev/null 2>&1 || qdie "socat did not create the tap within 10 s"
	local host_key
	host_key="$(wg genkey)"
	# shellcheck disable=SC2034 # WG_HOST_PUB and WG_APPEND are for the caller
	WG_HOST_PUB="$(printf '%s\n' "$host_key" | wg pubkey)"
	WG_GUEST_KEY="$(wg genkey)"
	WG_GUEST_PUB="$(printf '%s\n' "$WG_GUEST_KEY" | wg pubkey)"
	(umask 077 && printf '%s\n' "$host_key" > "$dir/host.key")
	ip netns exec "$WG_NS" wg set "$WG_DEV" private-key "$dir/host.key" listen-port "$WG_PORT" \
		peer "$WG_GUEST_PUB" allowed-ips "$WG_TUN_GUEST/32"
	ip -n "$WG_NS" addr add "$WG_TUN_HOST/24" dev "$WG_DEV"
	ip -n "$WG_NS" link set "$WG_DEV" up
	# No option ROM for the second NIC: SeaBIOS would load it for nothing (-kernel).
	QEMU_EXTRA+=(-netdev "dgram,id=wg0,local.type=unix,local.path=$dir/qemu.sock,remote.type=unix,remote.path=$dir/ns.sock"
		-device "virtio-net-pci,netdev=wg0,mac=52:54:00:77:00:02,romfile=")
	# shellcheck disable=SC2034
	WG_APPEND="test.eth1=$WG_LINK_GUEST/24"
}

# wg_host COMMAND...: run a command in the host-side WireGuard peer's namespace.
wg_host() { ip netns exec "$WG_NS" "$@"; }

# seed_config: the test node's configuration (DESIGN §3 keys) for $NODE_ID,
# then a /commit bump. Sets COMMIT_REV (mod revision of /commit). The node runs
# what the image carries: the real mihomo in TPROXY mode with MosDNS off, and a
# generic tunnel (`/bin/sleep`) so that two children show the stop order on
# poweroff. Its subscription, proxy node, health-check URL and DNS upstream are
# the host-side servers above.
seed_config() {
	local e=("${ETCDCTL[@]}")
	[ -n "${UPSTREAM_PORT:-}" ] || qdie "seed_config: start_dns_upstream first"
	[ -n "${HEALTH_URL:-}" ] || qdie "seed_config: start_subscription_server first"
	"${e[@]}" put "/nodes/$NODE_ID/dns/upstreams/host/addresses" "10.0.2.2:$UPSTREAM_PORT" >/dev/null
	"${e[@]}" put "/nodes/$NODE_ID/clash/health/url" "$HEALTH_URL" >/dev/null
	"${e[@]}" put "/nodes/$NODE_ID/lan" "192.168.100.0/24" >/dev/null
	"${e[@]}" put "/nodes/$NODE_ID/private_lan" "192.168.101.0/24" >/dev/null
	"${e[@]}" put "/nodes/$NODE_ID/api/token" "$API_TOKEN" >/dev/null
	"${e[@]}" put "/nodes/$NODE_ID/clash/enable" "true" >/dev/null
	"${e[@]}" put "/nodes/$NODE_ID/clash/mode" "tproxy" >/dev/null
	"${e[@]}" put "/nodes/$NODE_ID/clash/active_subscription" "test" >/dev/null
	"${e[@]}" put "/global/clash/subscriptions/test/url" "http://10.0.2.2:$SUB_PORT/sub.yaml" >/dev/null
	"${e[@]}" put "/nodes/$NODE_ID/mosdns/enable" "false" >/dev/null
	"${e[@]}" put "/nodes/$NODE_ID/tunnels/keepalive/enable" "true" >/dev/null
	"${e[@]}" put "/nodes/$NODE_ID/tunnels/keepalive/kind" "generic" >/dev/null
	"${e[@]}" put "/nodes/$NODE_ID/tunnels/keepalive/role" "server" >/dev/null
	"${e[@]}" put "/nodes/$NODE_ID/tunnels/keepalive/command" "/bin/sleep" >/dev/null
	"${e[@]}" put "/nodes/$NODE_ID/tunnels/keepalive/args" "86400" >/dev/null
	"${e[@]}" put "/dns/hosts/gw.qemu.test" "10.9.8.7" >/dev/null
	commit "qemu boot test"
}

# commit TEXT: bump /commit; sets COMMIT_REV to its mod revision.
commit() {
	"${ETCDCTL[@]}" put /commit "$(date +%s) $1" >/dev/null
	COMMIT_REV="$("${ETCDCTL[@]}" get /commit -w json | jq -r '.kvs[0].mod_revision')"
	[ -n "$COMMIT_REV" ] && [ "$COMMIT_REV" != null ] || qdie "cannot read /commit revision"
}

etcd_value() {
	"${ETCDCTL[@]}" get "$1" --print-value-only 2>/dev/null
}

# applied_is REV: the node's `/updated/<id>/applied` reports revision REV.
applied_is() {
	local v
	v="$(etcd_value "/updated/$NODE_ID/applied")"
	[ "${v%% *}" = "$1" ]
}

# qemu_cmd EXTRA_APPEND: sets QEMU_CMD (array) and picks DNS_PORT, API_PORT.
# The guest: q35 (x86_64) or virt with a Cortex-A53 (aarch64), 512 MiB, software
# emulation (TCG), serial console on stdio,
# user networking with the host's loopback at 10.0.2.2; the guest's DNS (53,
# UDP and TCP) and node API (9100) are forwarded to 127.0.0.1:$DNS_PORT and
# 127.0.0.1:$API_PORT. Provisioning is on the kernel command line.
# Optional, set by the caller:
#   QEMU_SMP            vCPUs (default 1; meduza's tokio runtime has one worker per CPU)
#   QEMU_EXTRA (array)  more QEMU arguments (a disk, a monitor: state-disk.sh)
#   QEMU_ON_RESET       `exit` (default, -no-reboot: a reset or a panic ends QEMU, so
#                       a test fails fast) or `reboot` (the guest boots again in the
#                       same QEMU with the same disks, as hardware does after a reset)
qemu_cmd() {
	local extra="$1"
	DNS_PORT="$(free_port)"
	API_PORT="$(free_port)"
	local console=ttyS0 machine=(-M q35)
	if [ "$QEMU_ARCH" = aarch64 ]; then
		# The virt board's PL011 UART; a Cortex-A53 as on a Raspberry Pi 3/4-class SBC.
		console=ttyAMA0
		machine=(-M virt -cpu cortex-a53)
	fi
	local append="console=$console printk.time=1 panic=-1"
	append="$append meduza.node_id=$NODE_ID meduza.etcd=http://10.0.2.2:$ETCD_PORT $extra"
	QEMU_CMD=("$QEMU_BIN" "${machine[@]}" -m 512 -smp "${QEMU_SMP:-1}" -nographic
		-kernel "$QEMU_BUILD/vmlinuz" -initrd "$QEMU_BUILD/initrd.cpio.gz"
		-append "$append"
		-netdev "user,id=n0,hostfwd=udp:127.0.0.1:$DNS_PORT-:53,hostfwd=tcp:127.0.0.1:$DNS_PORT-:53,hostfwd=tcp:127.0.0.1:$API_PORT-:9100"
		-device "virtio-net-pci,netdev=n0" -device virtio-rng-pci)
	case "${QEMU_ON_RESET:-exit}" in
	exit) QEMU_CMD+=(-no-reboot) ;;
	reboot) ;;
	*) qdie "QEMU_ON_RESET must be exit or reboot, not '$QEMU_ON_RESET'" ;;
	esac
	QEMU_CMD+=(${QEMU_EXTRA[@]+"${QEMU_EXTRA[@]}"})
}

# start_qemu DIR EXTRA_APPEND -> sets QEMU_PID, DNS_PORT, API_PORT, CONSOLE,
# QEMU_T0; the guest's serial console is written to $CONSOLE and its input is
# fd 7 (`send` below).
start_qemu() {
	local dir="$1"
	CONSOLE="$dir/console.log"
	mkfifo "$dir/console.in"
	qemu_cmd "$2"
	QEMU_T0="$(now)"
	"${QEMU_CMD[@]}" < "$dir/console.in" > "$CONSOLE" 2>&1 &
	QEMU_PID=$!
	exec 7> "$dir/console.in"
}

# send TEXT: type a line on the guest's serial console (a root shell).
send() { printf '%s\n' "$*" >&7; }

# alive PID: the process exists and is not a zombie (QEMU is our child; an
# exited child stays a zombie until reaped, and `kill -0` still succeeds).
alive() {
	local st
	st="$(ps -o stat= -p "$1" 2>/dev/null)" || return 1
	case "$st" in Z*|"") return 1 ;; esac
	return 0
}

# wait_for DEADLINE_S DESCRIPTION COMMAND...: poll until COMMAND succeeds.
# Prints the time since QEMU started on success.
wait_for() {
	local deadline="$1" what="$2" start
	shift 2
	start="$(now)"
	while ! "$@" >/dev/null 2>&1; do
		if [ -n "${QEMU_PID:-}" ] && ! alive "$QEMU_PID"; then
			qdie "QEMU exited while waiting for: $what (console: ${CONSOLE:-none})"
		fi
		if awk -v s="$start" -v n="$(now)" -v d="$deadline" 'BEGIN { exit !(n - s > d) }'; then
			qdie "timed out after ${deadline}s waiting for: $what (console: ${CONSOLE:-none})"
		fi
		sleep 0.05
	done
	elapsed "$QEMU_T0" "$(now)"
}

console_has() { grep -Eq "$1" "$CONSOLE"; }

# run_in_guest NAME COMMAND_LINE: type a command on the serial root shell and print
# its exit status. The marker is split in the typed text (M""ARK) so only the
# command's output matches; NAME must be unique over the console log (which
# spans every boot of one QEMU).
run_in_guest() {
	send "$2; echo M\"\"ARK-$1-\$?"
	wait_for 60 "guest command $1" console_has "^MARK-$1-[0-9]+" >/dev/null
	grep -Eo "^MARK-$1-[0-9]+" "$CONSOLE" | first | sed "s/^MARK-$1-//"
}

# guest_output NAME COMMAND_LINE: the standard output of a command typed on the
# serial shell, each line tagged in the guest (OUT-NAME: ...) so that kernel and
# meduza log lines interleaved on the console are left out. NAME as for run_in_guest.
guest_output() {
	send "{ $2; } 2>&1 | sed \"s/^/O\"\"UT-$1: /\"; echo E\"\"ND-$1"
	wait_for 60 "guest output $1" console_has "^END-$1" >/dev/null
	sed -n "s/^OUT-$1: //p" "$CONSOLE" | sed 's/\r$//'
}

# api PATH: GET from the node API through the forwarded port, with the test node's
# token (the API serves the token of the configuration meduza applied).
api() { curl -sf --max-time 5 -H "Authorization: Bearer $API_TOKEN" "http://127.0.0.1:$API_PORT$1"; }

# api_health_code: the HTTP status of the unauthenticated /v1/health (000: no answer).
api_health_code() {
	curl -s -o /dev/null -w '%{http_code}' --max-time 5 "http://127.0.0.1:$API_PORT/v1/health" || true
}

# services_running NAME...: the node API lists exactly these services as running
# (a child counts as running once it stayed up past the supervisor's start grace).
services_running() {
	api /v1/status | jq -e --args '[.services[] | select(.state == "running") | .name] | sort == ($ARGS.positional | sort)' "$@"
}

# poweroff_guest DEADLINE: type `poweroff` and wait for QEMU to exit.
poweroff_guest() {
	local qpid="$QEMU_PID"
	send "poweroff"
	QEMU_PID=""
	wait_for "$1" "QEMU exits after poweroff" sh -c "! ps -o stat= -p $qpid | grep -qv '^Z'" >/dev/null
	wait "$qpid" 2>/dev/null || true
}

# The EXIT trap of the QEMU tests: stop what the test started (by pid), show the
# guest console on failure, keep the temp dir on failure or with KEEP=1.
qemu_cleanup() {
	local rc=$?
	# Closing fd 7 only: `exec 7>&- 2>/dev/null` would send the rest of cleanup's
	# stderr (the console tail below) to /dev/null.
	exec 7>&-
	for p in ${WATCH_PID:-} ${QEMU_PID:-} ${NODE_PID:-} ${SUB_PID:-} ${UPSTREAM_PID:-} ${ETCD_PID:-} \
		${WG_GO_PID:-} ${WG_BRIDGE_PID:-}; do
		kill "$p" 2>/dev/null || true
	done
	wait 2>/dev/null || true
	if [ -n "${WG_NS:-}" ]; then
		ip netns del "$WG_NS" 2>/dev/null || true
		rm -f "/var/run/wireguard/$WG_DEV.sock"
	fi
	if [ "$rc" != 0 ] && [ -f "${CONSOLE:-/nonexistent}" ]; then
		echo "----- guest console (last 80 lines) -----" >&2
		tail -n 80 "$CONSOLE" >&2
	fi
	if [ "$KEEP" = 1 ] || [ "$rc" != 0 ]; then
		qlog "kept $TMP"
	else
		rm -rf "$TMP"
	fi
}
