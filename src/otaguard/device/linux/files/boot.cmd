# otaguard A/B slot selection for U-Boot (a boot script: U-Boot's distro boot runs /boot.scr).
#
#   mkimage -A x86 -O linux -T script -C none -n otaguard -d boot.cmd boot.scr
#
# This file is shipped product: it decides which root filesystem slot a device boots. It is
# the U-Boot twin of grub.cfg and implements the same contract with the otaguard Linux agent
# (src/otaguard/device/linux/uboot.py): the agent writes the boot state with libubootenv
# (fw_setenv), U-Boot reads it, and the only thing U-Boot ever writes back is the decremented
# tries-left counter of a pending slot.
#
# Disk layout (GPT):
#   sectors 0x200.. and 0x210..  two copies of the otaguard environment (see below), in the
#                                gap before the first partition
#   partition 1  boot (FAT)      /boot.scr (this script)
#   partition 2  slot A (ext4)   PARTLABEL rootfs-a, contains /boot/vmlinuz, /boot/initrd.img
#   partition 3  slot B (ext4)   PARTLABEL rootfs-b, same content for the other version
#   partition 4  data (ext4)     PARTLABEL otaguard-data (not touched by U-Boot)
#
# Boot state: a redundant U-Boot environment of 0x2000 bytes per copy, the format libubootenv
# writes with a two-line fw_env.config (files/fw_env.config):
#   bytes 0..3   CRC-32 of bytes 5..0x1fff (little endian)
#   byte  4      flags: a write counter; libubootenv writes the OTHER copy with flags + 1
#   bytes 5..    NAME=value\0 ... \0\0
# It is otaguard's own environment, not U-Boot's: this build keeps its environment nowhere,
# and a board that stores one must put it elsewhere (this script rewrites a copy with the
# variables below only). Variables:
#   OG_VALID=1            a copy without it counts as no boot state (the default below)
#   OG_SEQ, OG_SUM        the agent's write counter and checksum (U-Boot only carries them)
#   OG_ORDER="A B"|"B A"  slot priority, first = preferred
#   OG_A_STATE, OG_B_STATE   good | pending | bad
#   OG_A_TRIES, OG_B_TRIES   0..9: boot attempts left for a pending slot
#
# Algorithm:
#   1. Read both copies. A copy counts when its CRC is right. Of two, the newer by U-Boot's
#      own rule for a redundant environment: flags 0 beats 0xff (wrap-around), otherwise the
#      larger flags, copy 0 on a tie. Import only the variables above from it. No copy, or a
#      copy without OG_VALID=1: a built-in default, OG_ORDER="A B", both slots good.
#   2. For each slot s in OG_ORDER:
#        good                  -> boot s
#        pending, tries > 0    -> tries := tries - 1, written back into the copy it was read
#                                 from (same flags), then boot s
#        pending with 0, bad   -> skip
#   3. Nothing chosen: boot the first slot in OG_ORDER that is not bad, else slot A.
#
# Why the count-down rewrites the copy in place instead of writing the other copy with
# flags + 1: a try must be spent even when the write is torn. Torn in the other copy, this copy
# and its count stay in force, so a cut at each boot would retry forever. Torn in place, this
# copy fails its CRC and the other copy, written earlier by the agent, is in force: right after
# an install it does not name the slot pending at all (the agent takes a slot out of rotation
# before writing into it, docs/device-linux.md), and later the agent keeps U-Boot's count, so
# the fallback never holds more tries than this copy did.
#
# Before booting, a line
#   OTAGUARD-UBOOT: slot=<s> state=<state> tries-left=<n> env=<0|1|default>
# is printed so that the console log (and the test suite) shows U-Boot's decision.
#
# U-Boot's script language has no arithmetic and no address expressions: the RAM addresses
# below are literals. The environment size 0x2000 is built into them (0x1fff = size - 1,
# 0x1ffb = size - 5); change them together with og_env_cnt and fw_env.config.
#   0x10000000  copy 0 as read     0x10000004 its flags   0x10000001 its CRC moved next to
#                                                         the data (what "env import -c" takes)
#   0x10010000  copy 1, same shape
#   0x10020000  the copy to write back
#   0x10030000  flags of copy 0    0x10030001 flags of copy 1   0x10030010 a CRC in transit
#   0x10040000  env export -c: the highest, it clears far more RAM than the size it is given

# --- platform mapping (change here only) ---------------------------------------------------
setenv og_if virtio
setenv og_dev 0
# Sectors (512 bytes) of the two environment copies on ${og_if} ${og_dev}, and their length.
setenv og_env_blk0 0x200
setenv og_env_blk1 0x210
setenv og_env_cnt 0x10
setenv og_part_A 2
setenv og_part_B 3
setenv og_cmdline console=ttyS0
# Where the kernel and the initramfs are loaded. The initramfs goes far above the kernel: the
# x86 kernel decompresses itself over the memory after its load address (an initramfs at
# U-Boot's default ramdisk_addr_r of 0x4000000 arrives damaged).
setenv og_kernel_addr 0x1000000
setenv og_initrd_addr 0x20000000
# Starts the loaded kernel; ${filesize} is the initramfs' size (it is loaded last).
# ARM: booti ${og_kernel_addr} ${og_initrd_addr}:${filesize} ${fdtcontroladdr}
setenv og_bootcmd 'zboot ${og_kernel_addr} 0 ${og_initrd_addr} ${filesize}'

# --- read the boot state -------------------------------------------------------------------
setenv og_reset 'setenv OG_VALID; setenv OG_SEQ; setenv OG_ORDER; setenv OG_A_STATE; setenv OG_B_STATE; setenv OG_A_TRIES; setenv OG_B_TRIES; setenv OG_SUM'
${og_if} dev ${og_dev}

setenv og_v0 0
if ${og_if} read 0x10000000 ${og_env_blk0} ${og_env_cnt}; then
  cp.b 0x10000004 0x10030000 1
  cp.b 0x10000000 0x10030010 4
  cp.b 0x10030010 0x10000001 4
  if env import -c 0x10000001 0x1fff OG_VALID; then
    setenv og_v0 1
  fi
fi
setenv og_v1 0
if ${og_if} read 0x10010000 ${og_env_blk1} ${og_env_cnt}; then
  cp.b 0x10010004 0x10030001 1
  cp.b 0x10010000 0x10030010 4
  cp.b 0x10030010 0x10010001 4
  if env import -c 0x10010001 0x1fff OG_VALID; then
    setenv og_v1 1
  fi
fi

setenv og_env default
if test ${og_v0} = 1 && test ${og_v1} = 1; then
  if itest.b *0x10030000 == 0xff && itest.b *0x10030001 == 0; then
    setenv og_env 1
  elif itest.b *0x10030001 == 0xff && itest.b *0x10030000 == 0; then
    setenv og_env 0
  elif itest.b *0x10030001 -gt *0x10030000; then
    setenv og_env 1
  else
    setenv og_env 0
  fi
elif test ${og_v0} = 1; then
  setenv og_env 0
elif test ${og_v1} = 1; then
  setenv og_env 1
fi

run og_reset
if test ${og_env} = 0; then
  env import -c 0x10000001 0x1fff OG_VALID OG_SEQ OG_ORDER OG_A_STATE OG_B_STATE OG_A_TRIES OG_B_TRIES OG_SUM
  setenv og_wblk ${og_env_blk0}
  setenv og_wflags 0x10030000
elif test ${og_env} = 1; then
  env import -c 0x10010001 0x1fff OG_VALID OG_SEQ OG_ORDER OG_A_STATE OG_B_STATE OG_A_TRIES OG_B_TRIES OG_SUM
  setenv og_wblk ${og_env_blk1}
  setenv og_wflags 0x10030001
fi
if test "${OG_VALID}" != 1; then
  # Neither copy is usable: last resort, so that the device boots and can report.
  setenv og_env default
  run og_reset
  setenv OG_ORDER "A B"
  setenv OG_A_STATE good
  setenv OG_B_STATE good
fi

# Priority order. Anything other than exactly "B A" means "A B".
if test "${OG_ORDER}" = "B A"; then
  setenv og_first B
  setenv og_second A
else
  setenv og_first A
  setenv og_second B
fi

# --- helpers (run with og_slot = A or B) ---------------------------------------------------
# og_get: og_state and og_tries := the state and tries-left of og_slot; tries outside 0..9
# count as 0.
setenv og_get 'if test ${og_slot} = A; then setenv og_state "${OG_A_STATE}"; setenv og_tries "${OG_A_TRIES}"; else setenv og_state "${OG_B_STATE}"; setenv og_tries "${OG_B_TRIES}"; fi; if test "${og_tries}" = 1 || test "${og_tries}" = 2 || test "${og_tries}" = 3 || test "${og_tries}" = 4 || test "${og_tries}" = 5 || test "${og_tries}" = 6 || test "${og_tries}" = 7 || test "${og_tries}" = 8 || test "${og_tries}" = 9; then true; else setenv og_tries 0; fi'

# og_decrement: og_tries := og_tries - 1 (no arithmetic in U-Boot's shell). Needs 1..9.
setenv og_decrement 'if test ${og_tries} = 9; then setenv og_tries 8; elif test ${og_tries} = 8; then setenv og_tries 7; elif test ${og_tries} = 7; then setenv og_tries 6; elif test ${og_tries} = 6; then setenv og_tries 5; elif test ${og_tries} = 5; then setenv og_tries 4; elif test ${og_tries} = 4; then setenv og_tries 3; elif test ${og_tries} = 3; then setenv og_tries 2; elif test ${og_tries} = 2; then setenv og_tries 1; else setenv og_tries 0; fi'

# og_save: og_slot's new tries-left into the copy the state was read from, in place and with
# that copy's flags: "env export -c" gives CRC + data; the flags byte goes in between. A
# failed write is not a failed boot: the agent sees the old count and the next boot retries.
setenv og_save 'if test ${og_slot} = A; then setenv OG_A_TRIES ${og_tries}; else setenv OG_B_TRIES ${og_tries}; fi; if test ${og_env} != default; then env export -c -s 0x1fff 0x10040000 OG_VALID OG_SEQ OG_ORDER OG_A_STATE OG_B_STATE OG_A_TRIES OG_B_TRIES OG_SUM; cp.b 0x10040000 0x10020000 4; cp.b ${og_wflags} 0x10020004 1; cp.b 0x10040004 0x10020005 0x1ffb; ${og_if} write 0x10020000 ${og_wblk} ${og_env_cnt}; fi; true'

# og_boot: boot og_slot. Returns only if its kernel or initramfs could not be loaded.
setenv og_boot 'if test ${og_slot} = A; then setenv og_part ${og_part_A}; setenv og_label rootfs-a; else setenv og_part ${og_part_B}; setenv og_label rootfs-b; fi; echo "OTAGUARD-UBOOT: slot=${og_slot} state=${og_state} tries-left=${og_tries} env=${og_env}"; setenv bootargs "${og_cmdline} otaguard.slot=${og_slot} root=PARTLABEL=${og_label} ro panic=5"; if load ${og_if} ${og_dev}:${og_part} ${og_kernel_addr} /boot/vmlinuz && load ${og_if} ${og_dev}:${og_part} ${og_initrd_addr} /boot/initrd.img; then run og_bootcmd; fi; echo "OTAGUARD-UBOOT: slot=${og_slot} could not be loaded"'

# --- decide ----------------------------------------------------------------------------------
for og_s in ${og_first} ${og_second}; do
  setenv og_slot ${og_s}
  run og_get
  if test "${og_state}" = good; then
    run og_boot
  elif test "${og_state}" = pending && test ${og_tries} != 0; then
    run og_decrement
    run og_save
    run og_boot
  fi
done

# No slot qualified (or loading it failed): first slot in order that is not bad, else A.
for og_s in ${og_first} ${og_second}; do
  setenv og_slot ${og_s}
  run og_get
  if test "${og_state}" != bad; then
    run og_boot
  fi
done
setenv og_slot A
run og_get
run og_boot

echo "OTAGUARD-UBOOT: no bootable slot, resetting"
sleep 5
reset
