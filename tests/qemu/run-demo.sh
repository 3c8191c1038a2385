#!/usr/bin/env bash
# Interactive demo of the firmware under QEMU (`scripts/demo --qemu` calls this):
# builds the test image, starts a local etcd seeded with the example node
# configuration, boots the gateway with the serial console on this terminal
# and provisioning on the kernel command line.
#
#   tests/qemu/run-demo.sh [--no-build]
#
# In the guest: a root shell on the console; `poweroff` ends the demo (or
# Ctrl-A X). From the host, while it runs:
#   dig @127.0.0.1 -p <dns port> gw.qemu.test
#   etcdctl --endpoints http://127.0.0.1:<etcd port> get --prefix /updated/
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=lib.sh
. "$HERE/lib.sh"

BUILD_IMAGE=1
for a in "$@"; do
	case "$a" in
	--no-build) BUILD_IMAGE=0 ;;
	*) qdie "unknown argument $a" ;;
	esac
done

require_programs etcd etcdctl qemu-system-x86_64 jq python3
[ "$BUILD_IMAGE" = 1 ] && "$HERE/build-image.sh"

TMP="$(mktemp -d /tmp/meduza-demo.XXXXXX)"
cleanup() {
	for p in ${SUB_PID:-} ${ETCD_PID:-}; do
		kill "$p" 2>/dev/null || true
	done
	wait 2>/dev/null || true
	rm -rf "$TMP"
}
trap cleanup EXIT

start_etcd "$TMP"
start_subscription_server "$TMP"
seed_config
DNS_PORT="$(free_port)"
API_PORT="$(free_port)"

cat <<EOF
Meduza QEMU demo — node $NODE_ID
  etcd:     http://127.0.0.1:$ETCD_PORT   (guest sees it at http://10.0.2.2:$ETCD_PORT)
  DNS:      dig @127.0.0.1 -p $DNS_PORT gw.qemu.test
  node API: curl http://127.0.0.1:$API_PORT/v1/health
  status:   ETCDCTL_API=3 etcdctl --endpoints http://127.0.0.1:$ETCD_PORT get --prefix /updated/$NODE_ID/
  quit:     type 'poweroff' in the guest shell, or Ctrl-A X
EOF

qemu-system-x86_64 -M q35 -m 512 -nographic -no-reboot \
	-kernel "$QEMU_BUILD/vmlinuz" -initrd "$QEMU_BUILD/initrd.cpio.gz" \
	-append "console=ttyS0 panic=-1 meduza.node_id=$NODE_ID meduza.etcd=http://10.0.2.2:$ETCD_PORT" \
	-netdev "user,id=n0,hostfwd=udp:127.0.0.1:$DNS_PORT-:53,hostfwd=tcp:127.0.0.1:$DNS_PORT-:53,hostfwd=tcp:127.0.0.1:$API_PORT-:9100" \
	-device virtio-net-pci,netdev=n0 -device virtio-rng-pci
