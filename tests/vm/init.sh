#!/bin/sh
# /init (PID 1) of the otaguard test VM's initramfs (busybox sh). Built by tests/vm/build.py.
#
# The "root file system" the agent runs on is the HOST's, shared read-only over 9p (tag
# hostroot) and mounted at /host; the booted slot is mounted read-only at /host/media, the
# data partition read-write at /host/mnt. The agent runs in `chroot /host` so it uses the
# host's Python venv. Lines for the test harness start with "OTAGUARD-VM: ".
#
# This script must never exit (PID 1 exiting panics the kernel): it ends in `reboot -f`,
# which makes QEMU (-no-reboot) exit.

export PATH=/bin:/sbin:/usr/bin:/usr/sbin

say() { echo "OTAGUARD-VM: $*"; }

finish() {
	say done
	sync
	# Flush and detach the data partition and the ESP before the "power cut" of reboot -f.
	mount -o remount,ro /host/mnt 2>/dev/null
	mount -o remount,ro /host/srv 2>/dev/null
	sync
	reboot -f
	while :; do sleep 60; done
}

fail() {
	say "error: $*"
	dmesg | tail -n 30
	finish
}

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Keep kernel messages from interleaving with our console lines (dmesg still has them).
dmesg -n 1

# --- kernel modules (list and order from build.py; "?" = may fail) ---
while read -r m; do
	case $m in
	\?*) insmod "/lib/modules/${m#?}" 2>/dev/null ;;
	*) insmod "/lib/modules/$m" || say "warning: insmod $m failed" ;;
	esac
done </etc/otaguard-modules

# --- which slot did GRUB boot? ---
slot=
for word in $(cat /proc/cmdline); do
	case $word in
	otaguard.slot=*) slot=${word#otaguard.slot=} ;;
	esac
done
case $slot in
A) slot_label=rootfs-a ;;
B) slot_label=rootfs-b ;;
*) fail "no valid otaguard.slot= on the kernel command line: $(cat /proc/cmdline)" ;;
esac

# --- block devices by GPT partition label (no udev: read the uevent files) ---
find_part() {
	for u in /sys/class/block/*/uevent; do
		if grep -qx "PARTNAME=$1" "$u"; then
			echo "/dev/$(sed -n 's/^DEVNAME=//p' "$u")"
			return 0
		fi
	done
	return 1
}

wait_part() {
	i=0
	while [ $i -lt 100 ]; do
		if dev=$(find_part "$1"); then
			echo "$dev"
			return 0
		fi
		sleep 0.1
		i=$((i + 1))
	done
	return 1
}

slot_dev=$(wait_part "$slot_label") || fail "no partition labelled $slot_label"
mount -t ext4 -o ro "$slot_dev" /media || fail "cannot mount $slot_dev ($slot_label)"
version=$(sed -n 's/^VERSION=//p' /media/etc/otaguard-release 2>/dev/null | head -n 1)
say "slot=$slot version=$version"

if [ -e /media/etc/otaguard-hang ]; then
	say hanging
	while :; do sleep 3600; done
fi

# --- the host's root, read-only, as the agent's root file system ---
mount -t 9p -o ro,trans=virtio,version=9p2000.L,msize=524288,cache=loose hostroot /host ||
	fail "cannot mount the host root over 9p"
mount -t tmpfs -o mode=0755 tmpfs /host/run || fail "tmpfs /host/run"
# /host/tmp stays the host's (read-only): a checkout or venv under /tmp must be visible.
mkdir -p /dev/pts /dev/shm
mount -t devpts devpts /dev/pts
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
mount -o bind /dev /host/dev || fail "bind /dev"
mount -o bind /dev/pts /host/dev/pts
mount -o bind /dev/shm /host/dev/shm
mount -o bind /proc /host/proc || fail "bind /proc"
mount -o bind /sys /host/sys || fail "bind /sys"
mount --move /media /host/media || fail "move the slot to /host/media"

data_dev=$(wait_part otaguard-data) || say "warning: no partition labelled otaguard-data"
if [ -n "$data_dev" ]; then
	mount -t ext4 -o rw "$data_dev" /host/mnt || say "warning: cannot mount $data_dev"
fi

# The ESP (GRUB's env copies) at /host/srv: the agent's bootloader.grubenv paths point there.
esp_dev=$(wait_part esp) || say "warning: no partition labelled esp"
if [ -n "$esp_dev" ]; then
	mount -t vfat -o rw,flush "$esp_dev" /host/srv || say "warning: cannot mount $esp_dev"
fi

# --- network (QEMU user networking) ---
ip link set lo up
if ip link set eth0 up 2>/dev/null; then
	ip addr add 10.0.2.15/24 dev eth0
	ip route add default via 10.0.2.2
else
	say "warning: no eth0"
fi

# --- the agent ---
agent() {
	step=$1
	shift
	env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root \
		LANG=C.UTF-8 TMPDIR=/run /bin/busybox chroot /host \
		"$OTAGUARD_BIN" agent "$step" --config "$OTAGUARD_CONFIG"
	rc=$?
	say "$step rc=$rc"
	return $rc
}

if [ -f /host/mnt/boot.env ]; then
	. /host/mnt/boot.env
	if [ -z "$OTAGUARD_BIN" ] || [ -z "$OTAGUARD_CONFIG" ]; then
		say "warning: boot.env does not set OTAGUARD_BIN and OTAGUARD_CONFIG"
	else
		agent boot-check
		if agent self-test; then
			agent mark-good
		else
			agent mark-bad
		fi
		agent run
	fi
fi

finish
