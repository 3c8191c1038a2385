# shellcheck shell=bash
# Helpers of tests/qemu/power-cut-test.sh (sourced after lib.sh): the guest's
# persistent state disk, QEMU's monitor, and reading the disk from the host.
#
# The state disk stands in for a gateway's state partition: a raw image holding an
# ext4 file system labelled meduza-state, attached as a virtio disk. The image's
# meduza.toml says `state_device = "LABEL=meduza-state"`, so meduza's own boot duty
# (src/boot/mod.rs, "state partition") finds it by label and mounts it on
# $MEDUZA_STATE_DIR (/var/lib/meduza): the restart budgets (restart/<svc>.state), the
# last good snapshot (last-good.json) and the Clash secret. Without the disk the duty
# is skipped and that directory stays in the initramfs, in RAM.
#
# What a cut loses: QEMU and the host stay up, so everything the guest has sent to
# its virtual disk reaches the image file; the guest's RAM (page cache, dirty data
# not yet written, the journal's open transaction) is lost, and the file system is
# never unmounted. A real disk's volatile write cache losing writes the guest did not
# flush is not modelled.

STATE_DISK_LABEL=meduza-state

# make_state_disk PATH SIZE_MIB: a fresh raw image with an empty ext4 file system.
make_state_disk() {
	rm -f "$1"
	truncate -s "${2}M" "$1"
	mkfs.ext4 -q -F -L "$STATE_DISK_LABEL" "$1" || qdie "mkfs.ext4 $1 failed"
}

# attach_state_disk PATH: the image as the guest's virtio disk (appended to
# QEMU_EXTRA, lib.sh's qemu_cmd). virtio-blk-pci exists on every QEMU machine with
# PCI (q35 here, `virt` on arm64). cache=writeback is QEMU's default, spelled out:
# the guest sees a disk with a write cache, so its fsyncs are sent as flushes.
# MEDUZA_QEMU_STATE_IOPS=N throttles the disk to N requests a second (QEMU's
# throttling.iops-total), a stand-in for slow flash (an SD card's fsync takes tens of
# milliseconds): it widens every window between a write and its flush.
attach_state_disk() {
	local throttle=""
	[ -z "${MEDUZA_QEMU_STATE_IOPS:-}" ] || throttle=",throttling.iops-total=$MEDUZA_QEMU_STATE_IOPS"
	QEMU_EXTRA+=(-drive "file=$1,format=raw,if=none,id=state,cache=writeback$throttle"
		-device virtio-blk-pci,drive=state)
}

# attach_monitor SOCKET: QEMU's human monitor on a Unix socket (appended to
# QEMU_EXTRA); `monitor` sends it one command.
attach_monitor() {
	QEMU_MONITOR="$1"
	QEMU_EXTRA+=(-monitor "unix:$1,server=on,wait=off")
}

monitor() {
	printf '%s\n' "$1" | socat -t 1 - "UNIX-CONNECT:$QEMU_MONITOR" >/dev/null ||
		qdie "QEMU monitor command '$1' failed ($QEMU_MONITOR)"
}

# disk_cat IMAGE PATH: a file of the state disk, read from the host with debugfs
# (only while no guest has it mounted).
disk_cat() {
	debugfs -R "cat $2" "$1" 2>/dev/null
}

# disk_fsck IMAGE: a forced read-only check of the state disk; prints e2fsck's
# output, fails on any problem.
disk_fsck() {
	e2fsck -f -n "$1" 2>&1
}
