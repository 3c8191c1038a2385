#!/usr/bin/env bash
# Interactive demo of the firmware under QEMU (`scripts/demo --qemu` calls this):
# builds the test image, starts a local etcd loaded with the example
# configuration (docs/examples/three-nodes.json) plus the QEMU node's own keys
# (node qemu1: the real mihomo in TPROXY mode, a generic tunnel, a
# /dns/hosts/ record), boots the gateway with the serial console on this
# terminal and provisioning on the kernel command line (meduza.node_id=,
# meduza.etcd=).
#
#   tests/qemu/run-demo.sh [--arch x86_64|aarch64] [--no-build] [--node ID]
#
# --arch      the guest (default x86_64); aarch64 boots the ARM image (virt,
#             Cortex-A53), which runs the mihomo double (no arm64 mihomo here)
# --node ID   boot as another node of the example (gw-a, gw-b, gw-c); the image
#             carries only busybox, nft, meduza and mihomo, so that node's other
#             children (tinc, OpenVPN, FRR, ...) report missing programs in its
#             status.
#
# In the guest: a root shell on the console; `poweroff` ends the demo (or
# Ctrl-A X). The addresses to try from another terminal are printed first.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
# shellcheck source=lib.sh
. "$HERE/lib.sh"

BUILD_IMAGE=1
while [ $# -gt 0 ]; do
	case "$1" in
	--arch) [ $# -ge 2 ] || qdie "--arch needs x86_64 or aarch64"; qemu_arch "$2"; shift 2 ;;
	--no-build) BUILD_IMAGE=0; shift ;;
	--node) [ $# -ge 2 ] || qdie "--node needs an id"; NODE_ID="$2"; shift 2 ;;
	*) qdie "unknown argument $1" ;;
	esac
done

require_programs etcd etcdctl "$QEMU_BIN" jq python3 dnsmasq
if [ "$BUILD_IMAGE" = 1 ]; then
	"$HERE/build-image.sh" --arch "$QEMU_ARCH"
fi
[ -f "$QEMU_BUILD/vmlinuz" ] && [ -f "$QEMU_BUILD/initrd.cpio.gz" ] ||
	qdie "no image in $QEMU_BUILD (run tests/qemu/build-image.sh)"

TMP="$(mktemp -d /tmp/meduza-demo.XXXXXX)"
cleanup() {
	for p in ${NODE_PID:-} ${SUB_PID:-} ${UPSTREAM_PID:-} ${ETCD_PID:-}; do
		kill "$p" 2>/dev/null || true
	done
	wait 2>/dev/null || true
	rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_host_side "$TMP"
qlog "loading docs/examples/three-nodes.json"
ETCDCTL_ENDPOINTS="http://127.0.0.1:$ETCD_PORT" "$REPO/docs/examples/etcd-load.sh" \
	"$REPO/docs/examples/three-nodes.json"
if [ "$NODE_ID" = qemu1 ]; then
	seed_config
fi
qemu_cmd ""

cat <<EOF
Meduza QEMU demo — node $NODE_ID (software emulation: allow ~10 s to come up)
  etcd:     http://127.0.0.1:$ETCD_PORT   (guest sees it at http://10.0.2.2:$ETCD_PORT)
  DNS:      dig @127.0.0.1 -p $DNS_PORT gw.qemu.test
  node API: curl http://127.0.0.1:$API_PORT/v1/health
            curl -H 'Authorization: Bearer <token>' http://127.0.0.1:$API_PORT/v1/status
            (token: etcdctl get /nodes/$NODE_ID/api/token; qemu1: $API_TOKEN)
  status:   ETCDCTL_API=3 etcdctl --endpoints http://127.0.0.1:$ETCD_PORT get --prefix /updated/$NODE_ID/
  quit:     type 'poweroff' in the guest shell, or Ctrl-A X
EOF

"${QEMU_CMD[@]}"
