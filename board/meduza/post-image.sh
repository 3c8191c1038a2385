#!/bin/bash
# Buildroot post-image script (BR2_ROOTFS_POST_IMAGE_SCRIPT).
#   $1 = BINARIES_DIR, $2 = board variant (x86_64 | aarch64 | rpi4).
# Assembles the disk image with genimage: A/B read-only squashfs root slots and
# an ext4 state partition labelled meduza-state (mounted on /var/lib/meduza).
set -euo pipefail

BINARIES_DIR="$1"
VARIANT="${2:?post-image.sh: board variant argument missing}"
BOARD_DIR="$(cd "$(dirname "$0")" && pwd)"
GENIMAGE_TMP="${BUILD_DIR}/genimage.tmp"

case "$VARIANT" in
x86_64)
	CFG="$BOARD_DIR/genimage-x86_64.cfg"
	install -D -m 0644 "$BOARD_DIR/x86_64/grub.cfg" \
		"$BINARIES_DIR/efi-part/EFI/BOOT/grub.cfg"
	# GRUB environment block (exactly 1024 bytes): boot slot and the
	# provisioning arguments appended to the kernel command line.
	# Change on a flashed disk with: grub-editenv grubenv set boot_slot=b
	{
		printf '# GRUB Environment Block\n'
		printf 'boot_slot=a\n'
		printf 'meduza_args=\n'
	} > "$BINARIES_DIR/grubenv.tmp"
	size=$(stat -c %s "$BINARIES_DIR/grubenv.tmp")
	head -c $((1024 - size)) /dev/zero | tr '\0' '#' >> "$BINARIES_DIR/grubenv.tmp"
	mv "$BINARIES_DIR/grubenv.tmp" "$BINARIES_DIR/efi-part/EFI/BOOT/grubenv"
	;;
aarch64)
	CFG="$BOARD_DIR/genimage-aarch64.cfg"
	;;
rpi4)
	CFG="$BINARIES_DIR/genimage-rpi4.cfg"
	install -m 0644 "$BOARD_DIR/rpi4/cmdline.txt" "$BINARIES_DIR/rpi-firmware/cmdline.txt"
	install -m 0644 "$BOARD_DIR/rpi4/config.txt" "$BINARIES_DIR/rpi-firmware/config.txt"
	FILES=()
	for f in "$BINARIES_DIR"/*.dtb "$BINARIES_DIR"/rpi-firmware/*; do
		FILES+=("${f#"${BINARIES_DIR}"/}")
	done
	FILES+=("Image")
	BOOT_FILES=$(printf '\\t\\t\\t"%s",\\n' "${FILES[@]}")
	sed "s|#BOOT_FILES#|${BOOT_FILES}|" "$BOARD_DIR/genimage-rpi4.cfg.in" > "$CFG"
	;;
*)
	echo "post-image.sh: unknown board variant '$VARIANT'" >&2
	exit 1
	;;
esac

# genimage copies --rootpath; the root filesystem is a prebuilt image, so an
# empty directory avoids a useless copy of TARGET_DIR.
ROOTPATH_TMP="$(mktemp -d)"
trap 'rm -rf "$ROOTPATH_TMP"' EXIT
rm -rf "$GENIMAGE_TMP"
genimage \
	--rootpath "$ROOTPATH_TMP" \
	--tmppath "$GENIMAGE_TMP" \
	--inputpath "$BINARIES_DIR" \
	--outputpath "$BINARIES_DIR" \
	--config "$CFG"
