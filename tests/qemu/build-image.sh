#!/usr/bin/env bash
# Assemble the QEMU test image of the Meduza firmware without Buildroot (which
# cannot download here): Debian's cloud kernel and the modules the data plane
# needs (WireGuard among them: the kernel module and its crypto and UDP tunnel
# dependencies), static busybox as init, a static musl `meduza`, the real mihomo
# (the static Go release build scripts/install-deps caches, see
# scripts/mihomo-path) with its Country.mmdb, the host's `nft` and `wg` (with their
# shared libraries) and the repository's overlay/.
#
# Output (tests/qemu/build/, gitignored):
#   vmlinuz            the kernel
#   initrd.cpio.gz     the root filesystem (initramfs)
#   kernel-release     `uname -r` of the guest
#   mihomo-version     the version the image's mihomo reports (`mihomo -v`)
#
# Idempotent: downloads and the kernel extraction are kept between runs; the
# rootfs and the initramfs are rebuilt every time (the meduza binary changes).
#
#   tests/qemu/build-image.sh [--arch x86_64|aarch64]
#
# --arch aarch64 (or MEDUZA_QEMU_ARCH=aarch64) assembles the ARM image the same way
# from Debian's arm64 packages (`dpkg --add-architecture arm64` once, then
# `apt-get download`, cached in build/aarch64/debs/): the arm64 kernel and its
# modules, busybox-static, nft and wg with their shared libraries, and, as mihomo, the
# mihomo double (tests/support/doubles/fake_mihomo.py, with Debian's arm64 python3.11 and
# python3-yaml): the real mihomo here is amd64 only. meduza is
# `cargo build --profile qemu --target aarch64-unknown-linux-musl` (.cargo/config.toml
# links it with gcc-aarch64-linux-gnu). Output in tests/qemu/build/aarch64/.
#
# Environment:
#   MEDUZA_QEMU_ARCH  x86_64 (default) or aarch64; --arch wins
#   MEDUZA_BIN        use this static meduza instead of building one (default:
#                     `cargo build --profile qemu --target <arch>-unknown-linux-musl`)
#   MEDUZA_TEST_MIHOMO  put this static mihomo in the image instead of the cached
#                     $MIHOMO_BIN (scripts/mihomo-path; x86_64 only)
#   MEDUZA_QEMU_KERNEL  the Debian kernel flavour of the x86_64 image: cloud-amd64
#                     (default) or amd64, the generic kernel, whose modules include
#                     the i6300esb watchdog driver the cloud kernel lacks (the
#                     watchdog test's `--kernel amd64`); built into
#                     tests/qemu/build/generic/ (the same mapping as QEMU_BUILD in
#                     lib.sh)
#   CARGO_TARGET_DIR  as for cargo
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
# MIHOMO_VERSION, MIHOMO_BIN, MIHOMO_MMDB: the cached real mihomo.
# shellcheck source=SCRIPTDIR/../../scripts/mihomo-path
. "$REPO/scripts/mihomo-path"
ARCH="${MEDUZA_QEMU_ARCH:-x86_64}"
while [ $# -gt 0 ]; do
	case "$1" in
	--arch) ARCH="${2:-}"; shift 2 ;;
	--arch=*) ARCH="${1#--arch=}"; shift ;;
	*) printf '[build-image] ERROR: unknown argument %s\n' "$1" >&2; exit 1 ;;
	esac
done
case "$ARCH" in
x86_64)
	DEB_ARCH=amd64
	FLAVOUR="${MEDUZA_QEMU_KERNEL:-cloud-amd64}"
	case "$FLAVOUR" in
	cloud-amd64) BUILD="$HERE/build" ;;
	amd64) BUILD="$HERE/build/generic" ;;
	*) printf '[build-image] ERROR: MEDUZA_QEMU_KERNEL must be cloud-amd64 or amd64\n' >&2; exit 1 ;;
	esac
	;;
aarch64)
	DEB_ARCH=arm64
	FLAVOUR=arm64
	BUILD="$HERE/build/aarch64"
	;;
*) printf '[build-image] ERROR: --arch must be x86_64 or aarch64, not %s\n' "$ARCH" >&2; exit 1 ;;
esac
ROOTFS="$BUILD/rootfs"
TARGET_TRIPLE="$ARCH-unknown-linux-musl"
# Debian packages of the guest's architecture: "name:arm64" for the ARM image.
deb_pkg() { if [ "$DEB_ARCH" = amd64 ]; then echo "$1"; else echo "$1:$DEB_ARCH"; fi; }

log() { printf '[build-image] %s\n' "$*" >&2; }
# The first line of stdin, reading all of it (no SIGPIPE for the writer under pipefail).
first_line() { awk 'NR == 1'; }
die() { printf '[build-image] ERROR: %s\n' "$*" >&2; exit 1; }

need_cmd() {
	# $1 command, $2 Debian package providing it
	if ! command -v "$1" >/dev/null 2>&1; then
		log "installing $2 (for $1)"
		DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$2" >/dev/null ||
			die "cannot install $2"
	fi
}

mkdir -p "$BUILD/debs"

# --- host tools -----------------------------------------------------------
if [ "$DEB_ARCH" != amd64 ] && ! dpkg --print-foreign-architectures | grep -qx "$DEB_ARCH"; then
	log "dpkg --add-architecture $DEB_ARCH (for apt-get download of the guest's packages)"
	dpkg --add-architecture "$DEB_ARCH"
fi
if ! apt-cache show "$(deb_pkg "linux-image-$FLAVOUR")" >/dev/null 2>&1; then
	log "apt-get update"
	apt-get update -q >/dev/null
fi
need_cmd dpkg-deb dpkg
need_cmd cpio cpio
need_cmd depmod kmod
need_cmd musl-gcc musl-tools
need_cmd nft nftables
need_cmd wg wireguard-tools
[ -x /bin/busybox ] && /bin/busybox --list >/dev/null 2>&1 &&
	file -L /bin/busybox 2>/dev/null | grep -q 'statically linked' ||
	{ log "installing busybox-static"; DEBIAN_FRONTEND=noninteractive apt-get install -y -q busybox-static >/dev/null; }

# --- kernel ---------------------------------------------------------------
# linux-image-<flavour> is a metapackage; its dependency is the real image.
KPKG="$(apt-cache depends "$(deb_pkg "linux-image-$FLAVOUR")" |
	sed -n "s/^ *Depends: \(linux-image-[0-9].*-$FLAVOUR\)\(:$DEB_ARCH\)\{0,1\}\$/\1/p" | first_line)"
[ -n "$KPKG" ] || die "cannot resolve the kernel package behind linux-image-$FLAVOUR"
KREL="${KPKG#linux-image-}"
if ! ls "$BUILD/debs/${KPKG}"_*.deb >/dev/null 2>&1; then
	log "downloading $KPKG ($DEB_ARCH)"
	(cd "$BUILD/debs" && apt-get download "$(deb_pkg "$KPKG")" 2>/dev/null) || die "apt-get download $KPKG failed"
fi
KDIR="$BUILD/kernel"
if [ ! -f "$KDIR/.extracted-$KREL" ]; then
	log "extracting $KPKG"
	rm -rf "$KDIR"
	mkdir -p "$KDIR"
	dpkg-deb -x "$(ls "$BUILD/debs/${KPKG}"_*.deb | first_line)" "$KDIR"
	# The .deb ships no modules.dep (its postinst runs depmod).
	depmod -b "$KDIR" "$KREL"
	touch "$KDIR/.extracted-$KREL"
fi
cp "$KDIR/boot/vmlinuz-$KREL" "$BUILD/vmlinuz"
echo "$KREL" > "$BUILD/kernel-release"

# --- meduza (static musl) -------------------------------------------------
if [ -n "${MEDUZA_BIN:-}" ]; then
	MEDUZA="$MEDUZA_BIN"
else
	if ! rustup target list --installed 2>/dev/null | grep -qx "$TARGET_TRIPLE"; then
		log "rustup target add $TARGET_TRIPLE"
		rustup target add "$TARGET_TRIPLE" >/dev/null
	fi
	# The `qemu` profile (root Cargo.toml): release without LTO, opt-level 1,
	# 16 codegen units — built for CI time, not for the speed of the code.
	log "cargo build --profile qemu --target $TARGET_TRIPLE (meduza)"
	t0=$(date +%s)
	(cd "$REPO" && cargo build --profile qemu --locked --target "$TARGET_TRIPLE" --bin meduza)
	MEDUZA="${CARGO_TARGET_DIR:-$REPO/target}/$TARGET_TRIPLE/qemu/meduza"
	log "meduza built in $(($(date +%s) - t0)) s ($(du -h "$MEDUZA" | cut -f1))"
fi
[ -x "$MEDUZA" ] || die "meduza binary not found at $MEDUZA"
file -L "$MEDUZA" | grep -Eq 'static(-pie)? linked|statically linked' ||
	die "$MEDUZA is not statically linked"

# --- mihomo ----------------------------------------------------------------------
# x86_64: the real one (static Go). aarch64: the double, run by the guest's python3
# (no arm64 build of mihomo v1.19.2 is available here).
if [ "$ARCH" = x86_64 ]; then
	MIHOMO="${MEDUZA_TEST_MIHOMO:-$MIHOMO_BIN}"
	[ -x "$MIHOMO" ] || die "no mihomo at $MIHOMO (scripts/install-deps installs $MIHOMO_BIN)"
	[ -f "$MIHOMO_MMDB" ] || die "no Country.mmdb at $MIHOMO_MMDB (scripts/install-deps installs it)"
	file -L "$MIHOMO" | grep -Eq 'static(-pie)? linked|statically linked' ||
		die "$MIHOMO is not statically linked"
	MIHOMO_REPORTS="$("$MIHOMO" -v | sed -n '1s/^Mihomo Meta \(v[^ ]*\) .*/\1/p')"
	[ -n "$MIHOMO_REPORTS" ] || die "$MIHOMO -v does not print 'Mihomo Meta v<version> ...'"
	[ -n "${MEDUZA_TEST_MIHOMO:-}" ] || [ "$MIHOMO_REPORTS" = "$MIHOMO_VERSION" ] ||
		die "$MIHOMO reports $MIHOMO_REPORTS, want $MIHOMO_VERSION (rerun scripts/install-deps)"
else
	MIHOMO="$REPO/tests/support/doubles/fake_mihomo.py"
	MIHOMO_REPORTS="$(python3 "$MIHOMO" -v | sed -n '1s/^Mihomo Meta \(v[^ ]*\) .*/\1/p')"
	[ -n "$MIHOMO_REPORTS" ] || die "the mihomo double's -v does not print 'Mihomo Meta v<version> ...'"
fi

# --- the guest's userland from Debian packages (aarch64) -----------------------------
# busybox-static, nft, wg, and python3.11 with PyYAML for the mihomo double, each with
# the shared libraries it loads (listed by hand: apt's dependency closure drags in
# dpkg, perl and initramfs-tools). A missing library fails the boot test loudly.
ARM64_DEBS="libc6 libgcc-s1 busybox-static
	nftables libnftables1 libnftnl11 libmnl0 libjansson4 libgmp10 libedit2 libbsd0 libmd0
	libtinfo6 libxtables12 wireguard-tools
	python3.11-minimal libpython3.11-minimal libpython3.11-stdlib libexpat1 zlib1g libffi8
	libbz2-1.0 liblzma5 libcrypt1 libuuid1 python3-yaml libyaml-0-2"
USERLAND="$BUILD/userland"
if [ "$ARCH" = aarch64 ] && [ "$(cat "$USERLAND/.debs" 2>/dev/null)" != "$(echo $ARM64_DEBS)" ]; then
	rm -rf "$USERLAND"
	mkdir -p "$USERLAND"
	for p in $ARM64_DEBS; do
		if ! ls "$BUILD/debs/${p}"_*_"$DEB_ARCH".deb >/dev/null 2>&1; then
			log "downloading $p ($DEB_ARCH)"
			(cd "$BUILD/debs" && apt-get -qq download "$(deb_pkg "$p")" >/dev/null 2>&1) ||
				die "apt-get download $p:$DEB_ARCH failed"
		fi
		dpkg-deb -x "$(ls "$BUILD/debs/${p}"_*_"$DEB_ARCH".deb | first_line)" "$USERLAND"
	done
	rm -rf "$USERLAND/usr/share/doc" "$USERLAND/usr/share/man" "$USERLAND/usr/share/locale" \
		"$USERLAND/usr/share/lintian" "$USERLAND/usr/lib/python3.11/test" \
		"$USERLAND/usr/lib/python3.11/idlelib" "$USERLAND/usr/lib/python3.11/ensurepip"
	echo $ARM64_DEBS > "$USERLAND/.debs"
fi

# --- root filesystem ------------------------------------------------------
log "assembling rootfs"
rm -rf "$ROOTFS"
mkdir -p "$ROOTFS"/{bin,sbin,usr/bin,usr/sbin,usr/share,etc,proc,sys,dev,run,tmp,root,var/lib/meduza,lib/modules}
chmod 1777 "$ROOTFS/tmp"
chmod 0700 "$ROOTFS/var/lib/meduza"
ln -s ../run "$ROOTFS/var/run"

if [ "$ARCH" = x86_64 ]; then
	cp /bin/busybox "$ROOTFS/bin/busybox"
	chroot "$ROOTFS" /bin/busybox --install -s
else
	# The guest's libraries, nft, wg, python3 and busybox; the applet links as the
	# host's busybox-static (the same Debian version) lists them: the arm64 binary
	# cannot run here.
	cp -a "$USERLAND/." "$ROOTFS/"
	rm -f "$ROOTFS/.debs"
	/bin/busybox --list-full | while read -r applet; do
		[ -e "$ROOTFS/$applet" ] || [ -L "$ROOTFS/$applet" ] || ln -s /bin/busybox "$ROOTFS/$applet"
	done
fi
ln -sf bin/busybox "$ROOTFS/init"
# Device nodes needed before devtmpfs is mounted (the kernel opens /dev/console
# for init's stdio).
mknod -m 600 "$ROOTFS/dev/console" c 5 1
mknod -m 666 "$ROOTFS/dev/null" c 1 3

install -m 0755 "$MEDUZA" "$ROOTFS/usr/bin/meduza"

# nft (the nftables crate runs `nft -j -f -`) with its shared libraries.
copy_with_libs() {
	local bin="$1" dest="$2" lib
	install -D -m 0755 "$bin" "$ROOTFS$dest"
	for lib in $(ldd "$bin" | awk '/=>/ {print $3} /^\t\/lib/ {print $1}'); do
		[ -f "$lib" ] || continue
		install -D -m 0755 "$(readlink -f "$lib")" "$ROOTFS$lib"
	done
}
# wg (wireguard-tools, as the firmware ships): the boot test reads the kernel
# WireGuard device meduza configured with it, a second client of the same
# generic netlink family. (aarch64: both came with the userland above.)
if [ "$ARCH" = x86_64 ]; then
	copy_with_libs "$(command -v nft)" /usr/sbin/nft
	copy_with_libs "$(command -v wg)" /usr/bin/wg
fi
[ -e "$ROOTFS/usr/sbin/nft" ] && [ -e "$ROOTFS/usr/bin/wg" ] || die "nft or wg missing from the image"

# Kernel modules: the data plane's (boot duties load them), the expressions
# nft loads on demand, virtio drivers, the watchdogs S01watchdog tries; each with
# its dependencies. i6300esb (QEMU's watchdog device) only where the kernel has
# it: Debian's cloud kernel does not (CONFIG_I6300ESB_WDT is not set), so there
# softdog is the image's watchdog.
MODS="virtio_pci virtio_net virtio_rng virtio_blk virtio_console
	nf_tables nft_tproxy nf_tproxy_ipv4 nf_tproxy_ipv6 nft_socket nf_socket_ipv4
	nf_socket_ipv6 nft_fib_inet nft_fib_ipv4 nft_fib_ipv6 nft_ct nft_chain_nat nft_nat nft_masq
	nft_redir nft_reject_inet nft_reject_ipv4 nft_reject_ipv6 nft_limit nft_log
	nft_numgen nft_hash nft_quota nft_connlimit nf_conntrack nf_nat
	wireguard tun veth overlay squashfs softdog"
MODROOT="$KDIR/lib/modules/$KREL"
if modprobe -d "$KDIR" -S "$KREL" --show-depends i6300esb >/dev/null 2>&1; then
	MODS="$MODS i6300esb"
fi
for m in $MODS; do
	modprobe -d "$KDIR" -S "$KREL" --show-depends "$m" 2>/dev/null |
		awk '$1 == "insmod" {print $2}'
done | sort -u | while read -r ko; do
	rel="${ko#"$MODROOT"/}"
	install -D -m 0644 "$ko" "$ROOTFS/lib/modules/$KREL/$rel"
done
cp "$MODROOT"/modules.builtin* "$MODROOT"/modules.order "$ROOTFS/lib/modules/$KREL/"
depmod -b "$ROOTFS" "$KREL"

# The repository's overlay, then the test image's own files on top.
cp -a "$REPO/overlay/." "$ROOTFS/"
cp -a "$HERE/files/." "$ROOTFS/"
# mihomo where the image's settings expect it ([bin] mihomo in meduza.toml), and
# Country.mmdb in its home (`-d /etc/mihomo`), so it never tries to download one.
# The /etc overlay of the boot duties keeps /etc as its lower layer.
if [ "$ARCH" = x86_64 ]; then
	install -m 0755 "$MIHOMO" "$ROOTFS/usr/bin/mihomo"
	install -D -m 0644 "$MIHOMO_MMDB" "$ROOTFS/etc/mihomo/Country.mmdb"
else
	install -D -m 0644 "$MIHOMO" "$ROOTFS/usr/lib/meduza-test/fake_mihomo.py"
	printf '#!/bin/sh\n# The mihomo double (tests/support/doubles/fake_mihomo.py): no arm64 mihomo here.\nexport FAKE_MIHOMO_FETCH_PROVIDERS=1\nexec /usr/bin/python3.11 /usr/lib/meduza-test/fake_mihomo.py "$@"\n' \
		> "$ROOTFS/usr/bin/mihomo"
	chmod 0755 "$ROOTFS/usr/bin/mihomo"
fi
echo "$MIHOMO_REPORTS" > "$BUILD/mihomo-version"

# The overlay's inittab, adapted to an initramfs: devtmpfs first (a kernel
# with CONFIG_DEVTMPFS_MOUNT does this for a disk root, never for an
# initramfs), and a root shell on the console instead of getty so the test
# can type `poweroff`.
sed -e '0,/^::sysinit:/s||::sysinit:/bin/mount -t devtmpfs devtmpfs /dev\n::sysinit:|' \
	-e 's|^console::respawn:/sbin/getty.*|console::respawn:-/bin/sh|' \
	"$REPO/overlay/etc/inittab" > "$ROOTFS/etc/inittab"
grep -q '/usr/bin/meduza run' "$ROOTFS/etc/inittab" || die "overlay inittab has no meduza entry"

echo "qemu" > "$ROOTFS/etc/hostname"
printf 'root:x:0:0:root:/root:/bin/sh\n' > "$ROOTFS/etc/passwd"
printf 'root:x:0:\n' > "$ROOTFS/etc/group"
: > "$ROOTFS/etc/fstab"

log "packing initramfs"
(cd "$ROOTFS" && find . -print0 | cpio --null -o -H newc --quiet) | gzip -1 > "$BUILD/initrd.cpio.gz.tmp"
mv "$BUILD/initrd.cpio.gz.tmp" "$BUILD/initrd.cpio.gz"
log "done: $BUILD/vmlinuz ($(du -h "$BUILD/vmlinuz" | cut -f1)), $BUILD/initrd.cpio.gz ($(du -h "$BUILD/initrd.cpio.gz" | cut -f1)), kernel $KREL"
