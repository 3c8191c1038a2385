#!/bin/sh
# Buildroot post-build script (BR2_ROOTFS_POST_BUILD_SCRIPT).
#   $1 = TARGET_DIR, $2 = board variant (x86_64 | aarch64 | rpi4) from
#   BR2_ROOTFS_POST_SCRIPT_ARGS.
# Runs after the overlay is copied: completes the read-only root's layout.
set -eu

TARGET_DIR="$1"
VARIANT="${2:-}"
BOARD_DIR="$(dirname "$0")"

# Mount points that must exist on the read-only root (DESIGN §2, boot duties).
install -d -m 0700 "$TARGET_DIR/var/lib/meduza"
install -d -m 0755 "$TARGET_DIR/run" "$TARGET_DIR/etc/meduza"

# The defaults file ships in overlay/; refuse to build an image without it.
if [ ! -s "$TARGET_DIR/etc/meduza/meduza.toml" ]; then
	echo "post-build: $TARGET_DIR/etc/meduza/meduza.toml missing (overlay not applied?)" >&2
	exit 1
fi

# Child config directories meduza renders into (through the /etc overlay).
for d in mihomo mosdns frr tinc openvpn wireguard easytier; do
	install -d -m 0755 "$TARGET_DIR/etc/$d"
done

# Buildroot's skeleton fstab declares / as "rw"; the root is squashfs (ro).
if [ -f "$TARGET_DIR/etc/fstab" ]; then
	sed -i 's|^/dev/root[[:space:]].*|/dev/root\t/\t\tsquashfs\tro,noauto\t0\t0|' \
		"$TARGET_DIR/etc/fstab"
fi

# Image identity, for `cat /etc/meduza/image-release` on a box.
{
	echo "variant=$VARIANT"
	echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
	if command -v git >/dev/null 2>&1; then
		echo "commit=$(git -C "$BOARD_DIR" describe --always --dirty 2>/dev/null || echo unknown)"
	fi
} > "$TARGET_DIR/etc/meduza/image-release"
