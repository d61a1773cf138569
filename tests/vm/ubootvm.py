"""The U-Boot flavour of the test machine: Debian's U-Boot for QEMU x86 as the firmware, the
product boot script (files/boot.cmd, made into boot.scr with mkimage) on partition 1, and the
redundant U-Boot environment in the gap before partition 1 (where files/fw_env.config and
boot.cmd's mapping put it: sectors 0x200 and 0x210, 0x2000 bytes each).

U-Boot's distro boot finds /boot.scr on partition 1 by itself; nothing on the disk but the
script is U-Boot-specific, so slots, data partition and guest init are the GRUB machine's.
"""

from __future__ import annotations

import os
from pathlib import Path

from .. import ubootenv
from ..support import missing
from . import build

BOOT_CMD = build.REPO / "src" / "otaguard" / "device" / "linux" / "files" / "boot.cmd"
FW_ENV_EXAMPLE = BOOT_CMD.parent / "fw_env.config"
# The 32-bit build: the 64-bit one (qemu-x86_64) stops after "Loading bzImage" here.
UBOOT_ROM = Path("/usr/lib/u-boot/qemu-x86/u-boot.rom")
ENV_OFFSETS = (0x40000, 0x42000)
ENV_SIZE = 0x2000
GUEST_DISK = "/dev/vda"


def require_uboot_tools() -> None:
    build.require_vm_tools()
    if not UBOOT_ROM.exists():
        missing(f"{UBOOT_ROM} (Debian package u-boot-qemu)")
    for prog, pkg in (("mkimage", "u-boot-tools"), ("fw_setenv", "libubootenv-tool")):
        try:
            build._tool(prog)
        except FileNotFoundError:
            missing(f"program {prog!r} (Debian package {pkg})")


def fw_env_config(device: str | Path) -> str:
    """fw_env.config for the env copies on ``device`` (the guest's disk, or a file)."""
    return "".join(f"{device} {hex(off)} {hex(ENV_SIZE)}\n" for off in ENV_OFFSETS)


def boot_scr() -> Path:
    """boot.scr: the shipped boot.cmd wrapped by mkimage (a legacy script image)."""
    key = build.cache_key("uboot-scr", BOOT_CMD.read_bytes(), build.file_hash(UBOOT_ROM))

    def make(tmp: Path) -> None:
        build._run(
            ["mkimage", "-A", "x86", "-O", "linux", "-T", "script", "-C", "none",
             "-n", "otaguard", "-d", str(BOOT_CMD), str(tmp / "boot.scr")],
            env={"SOURCE_DATE_EPOCH": str(build.FIXED_TIME)},
        )  # fmt: skip

    return build.cached("uboot-scr", key, make) / "boot.scr"


def boot_partition() -> Path:
    """Partition 1 for U-Boot: FAT with /boot.scr (found by U-Boot's distro boot)."""
    scr = boot_scr()
    key = build.cache_key("uboot-boot", build.file_hash(scr))

    def make(tmp: Path) -> None:
        img = tmp / "boot.img"
        with img.open("wb") as f:
            f.truncate(build.ESP_SIZE)
        build._run(["mkfs.vfat", "-n", "BOOT", "-i", build.ESP_VOLUME_ID, str(img)])
        build._mtools(["mcopy", "-i", str(img), str(scr), "::/boot.scr"])

    return build.cached("uboot-boot", key, make) / "boot.img"


def disk(
    out: Path,
    *,
    slot_a: Path,
    slot_b: Path | None,
    data_dir: Path | None,
    env: tuple[bytes, bytes] | None,
) -> Path:
    """The GRUB machine's disk with U-Boot's boot partition and the two env copies."""
    build.disk(out, slot_a=slot_a, slot_b=slot_b, data_dir=data_dir, env={}, esp=boot_partition())
    if env is not None:
        write_copies(out, *env)
    return out


def read_copies(disk: Path) -> tuple[bytes, bytes]:
    with disk.open("rb") as f:
        out = []
        for off in ENV_OFFSETS:
            f.seek(off)
            out.append(f.read(ENV_SIZE))
    return out[0], out[1]


def write_copies(disk: Path, copy0: bytes, copy1: bytes) -> None:
    assert ENV_OFFSETS[1] + ENV_SIZE <= build.FIRST_LBA * build.SECTOR  # before partition 1
    with disk.open("r+b") as f:
        for off, data in zip(ENV_OFFSETS, (copy0, copy1), strict=True):
            assert len(data) == ENV_SIZE
            f.seek(off)
            f.write(data)
        f.flush()
        os.fsync(f.fileno())


def env_vars(disk: Path) -> dict[str, str] | None:
    """What U-Boot's rule reads from the disk's env copies (the independent model)."""
    return ubootenv.read(*read_copies(disk))


def encode(env: dict[str, str], flags: int) -> bytes:
    return ubootenv.encode(env, ENV_SIZE, flags)
