"""The Linux agent on a machine that boots through U-Boot: Debian's U-Boot for QEMU x86
(``-bios u-boot.rom``) → the shipped boot script (files/boot.cmd as boot.scr on partition 1)
→ the slot's kernel and initramfs → the agent (host Python over 9p) → the update server on
the host. The env is a redundant U-Boot environment before partition 1, written in the guest
by libubootenv's fw_setenv and counted down in place by boot.cmd.

What U-Boot chose is its own console line (``OTAGUARD-UBOOT: slot=...``), checked against
the guest init's line (the slot really mounted) and the env copies left on the disk, read
with an independent model of U-Boot's rule (tests/ubootenv.py).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from otaguard.device.linux.grubenv import BootEnv

from . import build, ubootvm
from .backend import Backend, backend, provision_disk
from .machine import Machine

pytestmark = pytest.mark.vm

BOOT = 300.0  # one boot + agent step under TCG on a loaded 2-core runner
UBOOT_RX = re.compile(
    r"OTAGUARD-UBOOT: slot=(?P<slot>[AB]) state=(?P<state>\S+) tries-left=(?P<tries>\S*) "
    r"env=(?P<env>\S+)"
)
VM_RX = re.compile(r"^OTAGUARD-VM: slot=(?P<slot>[AB]) version=(?P<version>\S*)$", re.M)
MAX_TRIES = 2


def test_the_vm_boots_the_shipped_script() -> None:
    assert (
        ubootvm.BOOT_CMD.resolve()
        == (build.REPO / "src/otaguard/device/linux/files/boot.cmd").resolve()
    )
    ubootvm.require_uboot_tools()
    scr = ubootvm.boot_scr().read_bytes()
    # a legacy script image: 64-byte header, a table of image sizes, then the script itself
    assert scr.endswith(ubootvm.BOOT_CMD.read_bytes())


@dataclass
class Boot:
    uboot_slot: str
    uboot_state: str
    tries_left: str
    env: str
    slot: str
    version: str
    seconds: float


@dataclass
class Rig:
    be: Backend | None
    disk: Path
    work: Path
    boots: list[Boot] = field(default_factory=list)
    vm: Machine | None = None

    def start(self) -> Machine:
        assert self.vm is None or not self.vm.running
        port = None if self.be is None else self.be.relay.port
        self.vm = Machine(
            self.disk, self.work, host_port=port, bios=ubootvm.UBOOT_ROM,
            name=f"uboot{len(self.boots) + 1}",
        ).start()  # fmt: skip
        return self.vm

    def booted(self, vm: Machine) -> Boot:
        u = vm.wait_for(UBOOT_RX, BOOT)
        v = vm.wait_for(VM_RX, BOOT)
        b = Boot(u["slot"], u["state"], u["tries"], u["env"], v["slot"], v["version"], 0.0)
        b.seconds = vm.elapsed()
        assert b.slot == b.uboot_slot  # the slot U-Boot chose is the one that runs
        self.boots.append(b)
        print(f"[{vm.name}] U-Boot chose {b.uboot_slot} ({b.uboot_state}, {b.tries_left} left, "
              f"env={b.env}); init up after {b.seconds:.1f}s")  # fmt: skip
        return b

    def env(self) -> BootEnv:
        v = ubootvm.env_vars(self.disk)
        assert v is not None, "no valid env copy"
        return BootEnv.from_variables(v)


@pytest.fixture(scope="module")
def images() -> dict[str, Path]:
    ubootvm.require_uboot_tools()
    return {
        "1.0.0": build.slot_image("1.0.0"),
        "2.0.0": build.slot_image("2.0.0", extra=b"2.0.0 payload\n" * 512),
        "2.0.0-bad": build.slot_image("2.0.0-bad", self_test_ok=False, extra=b"bad\n" * 512),
    }


@pytest.fixture
def rig(tmp_path: Path, images: dict[str, Path]) -> Iterator[Rig]:
    with backend(tmp_path / "server") as be:
        factory = be.publish("1.0.0", images["1.0.0"], counter=1)
        disk = provision_disk(be, tmp_path / "disk.img", factory, max_tries=MAX_TRIES, uboot=True)
        r = Rig(be, disk, tmp_path / "vm")
        try:
            yield r
        finally:
            if r.vm is not None:
                r.vm.kill()


def og(order: str, a: str, b: str, a_tries: int = 0, b_tries: int = 0) -> dict[str, str]:
    env = BootEnv(7, (order[0], order[2]), (a, b), (a_tries, b_tries))  # type: ignore[arg-type]
    return env.variables()


def test_script_picks_newest_copy_counts_down_and_falls_back(
    tmp_path: Path, images: dict[str, Path]
) -> None:
    """No agent: copy 1 (flags 0) is newer than copy 0 (flags 0xff, wrap-around) and says
    B pending with one try. U-Boot boots B, writes tries 0 into copy 1 in place (same flags,
    copy 0 untouched); at the next power-on B has no tries left and U-Boot starts A."""
    old = ubootvm.encode(og("A B", "good", "bad"), 0xFF)
    new = ubootvm.encode(og("B A", "good", "pending", b_tries=1), 0x00)
    disk = ubootvm.disk(
        tmp_path / "disk.img", slot_a=images["1.0.0"], slot_b=images["2.0.0"], data_dir=None,
        env=(old, new),
    )  # fmt: skip
    r = Rig(None, disk, tmp_path / "vm")
    vm = r.start()
    b = r.booted(vm)
    assert (b.uboot_slot, b.uboot_state, b.tries_left, b.env) == ("B", "pending", "0", "1")
    assert b.version == "2.0.0"
    vm.kill()  # the image never confirms itself (a watchdog reset)
    c0, c1 = ubootvm.read_copies(disk)
    assert c0 == old and c1[4] == 0x00  # in place: copy 1, flags kept
    assert r.env() == BootEnv.from_variables(og("B A", "good", "pending", b_tries=0))
    vm = r.start()
    b = r.booted(vm)
    assert (b.uboot_slot, b.uboot_state, b.env, b.version) == ("A", "good", "1", "1.0.0")
    vm.kill()
    # copy 1 torn (a power cut in U-Boot's write): copy 0 is in force, A first
    write = bytearray(c1)
    write[100:200] = b"\xa5" * 100
    ubootvm.write_copies(disk, old, bytes(write))
    vm = r.start()
    b = r.booted(vm)
    assert (b.uboot_slot, b.env) == ("A", "0")
    vm.kill()


def first_boot_idle(rig: Rig) -> Machine:
    vm = rig.start()
    b = rig.booted(vm)
    assert (b.uboot_slot, b.uboot_state, b.version) == ("A", "good", "1.0.0")
    vm.wait_for(r"otaguard-agent: boot-check slot=A mode=normal version=1\.0\.0", BOOT)
    vm.wait_for(r"otaguard-agent: poll outcome=idle version=1\.0\.0", BOOT)
    return vm


def test_self_test_failure_falls_back_through_uboot(rig: Rig, images: dict[str, Path]) -> None:
    be = rig.be
    assert be is not None
    vm = first_boot_idle(rig)
    be.assign(be.publish("2.0.0", images["2.0.0-bad"], counter=2))
    vm.wait_for(r"rebooting: rebooting to start the installed image", BOOT)
    vm.wait_exit(BOOT)
    vm = rig.start()
    b = rig.booted(vm)
    assert (b.uboot_slot, b.uboot_state) == ("B", "pending")
    vm.wait_for(r"self-test failed", BOOT)
    vm.wait_for(r"rebooting: slot B failed its self-test", BOOT)
    vm.wait_exit(BOOT)
    env = rig.env()
    assert env.order == ("A", "B") and env.states == ("good", "bad")
    vm = rig.start()
    b = rig.booted(vm)
    assert (b.uboot_slot, b.uboot_state, b.version) == ("A", "good", "1.0.0")
    vm.wait_for(r"sent 1 queued report", BOOT)
    vm.kill()
    assert any(r["state"] == "reverted" and r["error_code"] == "E_SELF_TEST" for r in be.reports())


def test_update_with_power_cuts_through_uboot(rig: Rig, images: dict[str, Path]) -> None:
    """Update A -> B with SIGKILLs during the image write and right after the env switch
    (the agent's reboot line follows it): every boot starts a valid signed slot, U-Boot
    counts B's try down, the agent confirms B and the server records it."""
    be = rig.be
    assert be is not None
    vm = first_boot_idle(rig)
    be.relay.rate = 1024 * 1024  # a slow link: the write takes ~16 s
    be.assign(be.publish("2.0.0", images["2.0.0"], counter=2))
    # 1. during the image write
    vm.wait_for(r"progress slot=B bytes=\d+/\d+", BOOT)
    vm.kill()
    assert rig.env().states[1] == "bad"  # out of rotation before the first byte
    vm = rig.start()
    b = rig.booted(vm)
    assert (b.uboot_slot, b.uboot_state, b.version) == ("A", "good", "1.0.0")
    # 2. the download resumes and completes; cut right after fw_setenv switched to B
    be.relay.rate = None
    vm.wait_for(r"rebooting: rebooting to start the installed image", BOOT)
    vm.kill()
    env = rig.env()  # written in the guest by fw_setenv
    assert env.order == ("B", "A") and env.states == ("good", "pending")
    assert env.tries == (0, MAX_TRIES)
    vm = rig.start()
    b = rig.booted(vm)
    assert (b.uboot_slot, b.uboot_state, b.tries_left, b.version) == (
        "B", "pending", str(MAX_TRIES - 1), "2.0.0",
    )  # fmt: skip
    vm.wait_for(r"boot-check slot=B mode=test version=2\.0\.0", BOOT)
    vm.wait_for(r"mark-good: slot B version 2\.0\.0 confirmed", BOOT)
    vm.wait_for(r"poll outcome=idle version=2\.0\.0", BOOT)
    vm.kill()
    env = rig.env()
    assert env.order == ("B", "A") and env.states == ("good", "good")
    assert be.device()["current_version"] == "2.0.0"
    assert "confirmed" in {r["state"] for r in be.reports()}
    assert all(bt.version in ("1.0.0", "2.0.0") for bt in rig.boots)
