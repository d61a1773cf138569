"""`otaguard agent` updating a real (virtual) machine: OVMF → GRUB (the shipped grub.cfg) →
Debian's kernel from the slot partition → the agent (host Python over 9p, in the guest) →
`otaguard` update server on the host over mTLS (QEMU user networking, restrict=on, the one
forwarded port). Every reboot is a real one (the guest reboots, QEMU exits, the next QEMU
run boots the same disk); every power cut is a SIGKILL of QEMU.

Each scenario asserts what GRUB started (its console line), the version running (the slot's
release file, printed by the guest init), the agent's own lines, the env copies GRUB and the
agent left on the ESP, the counters on the data partition, and what the server recorded.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from otaguard.device.linux.grubenv import BootEnv, GrubEnvStore
from otaguard.device.linux.system import open_storage

from . import build
from .backend import Backend, Release, backend, provision_disk
from .machine import Machine

pytestmark = pytest.mark.vm

BOOT = 300.0  # seconds for one boot + agent step under TCG on a loaded 2-core runner
GRUB_RX = re.compile(
    r"OTAGUARD-GRUB: slot=(?P<slot>[AB]) state=(?P<state>\S+) tries-left=(?P<tries>\S*)"
)
VM_RX = re.compile(r"^OTAGUARD-VM: slot=(?P<slot>[AB]) version=(?P<version>\S*)$", re.M)
MAX_TRIES = 2


@dataclass
class Boot:
    """What one QEMU run showed."""

    grub_slot: str
    grub_state: str
    slot: str
    version: str
    log: str
    seconds: float


@dataclass
class Rig:
    be: Backend
    disk: Path
    work: Path
    boots: list[Boot] = field(default_factory=list)
    vm: Machine | None = None

    def start(self) -> Machine:
        assert self.vm is None or not self.vm.running
        self.vm = Machine(
            self.disk, self.work, host_port=self.be.relay.port, vars_file=self.work / "vars.fd",
            name=f"boot{len(self.boots) + 1}",
        ).start()  # fmt: skip
        return self.vm

    def booted(self, vm: Machine) -> Boot:
        g = vm.wait_for(GRUB_RX, BOOT)
        v = vm.wait_for(VM_RX, BOOT)
        b = Boot(g["slot"], g["state"], v["slot"], v["version"], "", vm.elapsed())
        self.boots.append(b)
        return b

    def finish(self, vm: Machine, timeout: float = BOOT) -> str:
        """Wait until the guest reboots by itself (QEMU exits: -no-reboot)."""
        vm.wait_exit(timeout)
        log = vm.log_text()
        self.boots[-1].log = log
        return log

    def cut(self, vm: Machine) -> str:
        vm.kill()
        log = vm.log_text()
        if self.boots:
            self.boots[-1].log = log
        return log

    def env(self) -> BootEnv:
        """The decision in force: what the agent's own reader takes from the two copies."""
        d = self.work / "env-copy"
        d.mkdir(parents=True, exist_ok=True)
        for i in (0, 1):
            (d / str(i)).write_bytes(build.esp_read(self.disk, f"/otaguard/grubenv.{i}"))
        return GrubEnvStore((d / "0", d / "1")).read(repair=False)

    def counters(self) -> dict[str, int]:
        """The counters on the data partition, read as the next boot would: a copy of the
        partition with its journal replayed first (the VM was killed, not shut down)."""
        d = self.work / "state-copy"
        shutil.rmtree(d, ignore_errors=True)
        d.mkdir()
        part = d / "data.img"
        with self.disk.open("rb") as src, part.open("wb") as dst:
            src.seek(build.partition_offset(self.disk, 4))
            left = build.partition_size(self.disk, 4)
            while left:
                chunk = src.read(min(left, 1 << 20))
                dst.write(chunk)
                left -= len(chunk)
        fsck = subprocess.run(["e2fsck", "-fy", str(part)], capture_output=True, check=False)
        assert fsck.returncode in (0, 1), fsck.stdout  # 1: the journal was replayed
        for name in ("otp", "counters.rec"):
            out = d / name
            subprocess.run(
                ["debugfs", "-R", f"dump /otaguard/{name} {out}", str(part)],
                capture_output=True,
                check=True,
            )
        return open_storage(d).counters().as_dict()

    def slot_bytes(self, slot: str, n: int) -> bytes:
        part = {"A": 2, "B": 3}[slot]
        with self.disk.open("rb") as f:
            f.seek(build.partition_offset(self.disk, part))
            return f.read(n)


@pytest.fixture(scope="module")
def images() -> dict[str, Path]:
    build.require_vm_tools()
    return {
        "1.0.0": build.slot_image("1.0.0"),
        "2.0.0": build.slot_image("2.0.0", extra=b"2.0.0 payload\n" * 512),
        "2.0.0-bad": build.slot_image("2.0.0-bad", self_test_ok=False, extra=b"bad\n" * 512),
        "2.0.0-hang": build.slot_image("2.0.0-hang", hang=True, extra=b"hang\n" * 512),
        "1.5.0": build.slot_image("1.5.0", extra=b"1.5.0 payload\n" * 512),
    }


@pytest.fixture
def rig(tmp_path: Path, images: dict[str, Path]) -> Iterator[Rig]:
    with backend(tmp_path / "server") as be:
        factory = be.publish("1.0.0", images["1.0.0"], counter=1)
        disk = provision_disk(be, tmp_path / "disk.img", factory, max_tries=MAX_TRIES)
        r = Rig(be, disk, tmp_path / "vm")
        try:
            yield r
        finally:
            if r.vm is not None:
                r.vm.kill()


def first_boot_idle(rig: Rig) -> Machine:
    """Boot slot A as the factory left it; the agent checks in and has nothing to do."""
    vm = rig.start()
    b = rig.booted(vm)
    assert (b.grub_slot, b.grub_state, b.slot, b.version) == ("A", "good", "A", "1.0.0")
    vm.wait_for(r"otaguard-agent: boot-check slot=A mode=normal version=1\.0\.0", BOOT)
    vm.wait_for(r"otaguard-agent: poll outcome=idle version=1\.0\.0", BOOT)
    return vm


def install_and_reboot(rig: Rig, vm: Machine, release: Release) -> str:
    """The running agent picks the release up at its next poll, installs it, reboots."""
    vm.wait_for(r"otaguard-agent: rebooting: rebooting to start the installed image", BOOT)
    log = rig.finish(vm)
    env = rig.env()
    other = "B" if env.order[0] == "B" else "A"
    assert env.states["AB".index(other)] == "pending" and env.tries["AB".index(other)] == MAX_TRIES
    return log


def test_campaign_update_then_rollback_refused(rig: Rig, images: dict[str, Path]) -> None:
    be = rig.be
    vm = first_boot_idle(rig)
    rel = be.publish("2.0.0", images["2.0.0"], counter=2)
    be.campaign("spring", rel)
    install_and_reboot(rig, vm, rel)
    # boot 2: GRUB tries B, the boot check verifies it, the self-test passes, confirmed
    vm = rig.start()
    b = rig.booted(vm)
    assert (b.grub_slot, b.grub_state, b.slot, b.version) == ("B", "pending", "B", "2.0.0")
    vm.wait_for(r"boot-check slot=B mode=test version=2\.0\.0", BOOT)
    vm.wait_for(r"self-test passed slot=B mode=test", BOOT)
    vm.wait_for(r"mark-good: slot B version 2\.0\.0 confirmed", BOOT)
    vm.wait_for(r"sent 1 queued report", BOOT)
    vm.wait_for(r"poll outcome=idle version=2\.0\.0", BOOT)
    st = be.campaign_status("spring")
    assert st["counts"]["succeeded"] == 1, st
    assert be.device()["current_version"] == "2.0.0"
    assert "confirmed" in {r["state"] for r in be.reports()}
    # a validly signed older release (counter 1 < 2) is refused before a byte is fetched
    a_before = rig.slot_bytes("A", 1 << 20)
    old = be.publish("1.5.0", images["1.5.0"], counter=1)
    be.assign(old)
    vm.wait_for(
        r"poll outcome=failed version=2\.0\.0 offered=1\.5\.0 error=E_SECURITY_COUNTER", BOOT
    )
    rig.cut(vm)
    assert "E_SECURITY_COUNTER" in {r["error_code"] for r in be.reports()}
    assert rig.slot_bytes("A", 1 << 20) == a_before  # the fallback slot untouched
    env = rig.env()
    assert env.order == ("B", "A") and env.states == ("good", "good")
    assert rig.counters()["security"] == 2


def test_delta_update_and_a_corrupt_env_copy(rig: Rig, images: dict[str, Path]) -> None:
    be = rig.be
    build.esp_write(rig.disk, "/otaguard/grubenv.0", b"\x00garbage" * 128)
    vm = rig.start()
    b = rig.booted(vm)  # GRUB ignores copy 0 and boots what copy 1 says
    assert (b.grub_slot, b.slot, b.version) == ("A", "A", "1.0.0")
    assert "env=1" in vm.log_text()
    vm.wait_for(r"poll outcome=idle version=1\.0\.0", BOOT)
    # the agent repaired copy 0 from copy 1 at its boot check
    assert build.esp_read(rig.disk, "/otaguard/grubenv.0") == build.esp_read(
        rig.disk, "/otaguard/grubenv.1"
    )
    sent_before = be.relay.sent
    rel = be.publish("2.0.0", images["2.0.0"], counter=2, delta_from="1.0.0")
    be.assign(rel)
    install_and_reboot(rig, vm, rel)
    fetched = be.relay.sent - sent_before
    image_size = images["2.0.0"].stat().st_size
    assert fetched < image_size // 4, (fetched, image_size)  # the patch, not the image
    vm = rig.start()
    b = rig.booted(vm)
    assert (b.slot, b.version) == ("B", "2.0.0")
    vm.wait_for(r"mark-good: slot B version 2\.0\.0 confirmed", BOOT)
    vm.wait_for(r"poll outcome=idle version=2\.0\.0", BOOT)
    rig.cut(vm)
    assert rig.counters()["security"] == 2


def test_self_test_failure_falls_back(rig: Rig, images: dict[str, Path]) -> None:
    be = rig.be
    vm = first_boot_idle(rig)
    rel = be.publish("2.0.0", images["2.0.0-bad"], counter=2)
    be.assign(rel)
    install_and_reboot(rig, vm, rel)
    vm = rig.start()
    b = rig.booted(vm)
    assert (b.grub_slot, b.slot) == ("B", "B")
    vm.wait_for(r"self-test failed", BOOT)
    vm.wait_for(r"rebooting: slot B failed its self-test", BOOT)
    rig.finish(vm)
    env = rig.env()
    assert env.order == ("A", "B") and env.states == ("good", "bad")
    vm = rig.start()
    b = rig.booted(vm)
    assert (b.grub_slot, b.grub_state, b.slot, b.version) == ("A", "good", "A", "1.0.0")
    vm.wait_for(r"sent 1 queued report", BOOT)
    vm.wait_for(r"poll outcome=\S+ version=1\.0\.0", BOOT)
    rig.cut(vm)
    assert any(r["state"] == "reverted" and r["error_code"] == "E_SELF_TEST" for r in be.reports())
    assert rig.counters()["security"] == 1  # the failed image never raised it


def test_hanging_slot_runs_out_of_tries(rig: Rig, images: dict[str, Path]) -> None:
    be = rig.be
    vm = first_boot_idle(rig)
    rel = be.publish("2.0.0", images["2.0.0-hang"], counter=2)
    be.assign(rel)
    install_and_reboot(rig, vm, rel)
    for left in range(MAX_TRIES - 1, -1, -1):
        vm = rig.start()
        b = rig.booted(vm)
        assert (b.grub_slot, b.grub_state, b.version) == ("B", "pending", "2.0.0-hang")
        assert rig.env().tries[1] == left  # GRUB counted the try before starting the kernel
        vm.wait_for(r"OTAGUARD-VM: hanging", BOOT)
        rig.cut(vm)  # nothing will ever confirm it: the hardware watchdog resets the board
    vm = rig.start()
    b = rig.booted(vm)  # no tries left: GRUB starts A on its own
    assert (b.grub_slot, b.slot, b.version) == ("A", "A", "1.0.0")
    vm.wait_for(r"boot-check slot=A mode=normal version=1\.0\.0 reverted=E_WATCHDOG", BOOT)
    vm.wait_for(r"poll outcome=\S+ version=1\.0\.0", BOOT)
    rig.cut(vm)
    env = rig.env()
    assert env.order == ("A", "B") and env.states == ("good", "bad")
    assert be.device()["last_error"] == "E_WATCHDOG"


def test_altered_pending_slot_refused_at_first_boot(rig: Rig, images: dict[str, Path]) -> None:
    be = rig.be
    vm = first_boot_idle(rig)
    rel = be.publish("2.0.0", images["2.0.0"], counter=2)
    be.assign(rel)
    install_and_reboot(rig, vm, rel)
    # an attacker with the disk changes bytes inside the installed, not yet trusted slot B:
    # in the image's free blocks (15 MiB in), so the kernel still starts and only the boot
    # check can tell (bytes in the kernel itself make it hang: the tries case below)
    off = build.partition_offset(rig.disk, 3) + 15 * 1024 * 1024
    with rig.disk.open("r+b") as f:
        f.seek(off)
        f.write(b"\xde\xad\xbe\xef" * 16)
    vm = rig.start()
    b = rig.booted(vm)
    assert b.grub_slot == "B"  # GRUB cannot tell; the boot check can
    vm.wait_for(r"rebooting: slot B must not run; rebooting into slot A", BOOT)
    rig.finish(vm)
    vm = rig.start()
    b = rig.booted(vm)
    assert (b.grub_slot, b.slot, b.version) == ("A", "A", "1.0.0")
    vm.wait_for(r"poll outcome=\S+ version=1\.0\.0", BOOT)
    rig.cut(vm)
    assert be.device()["last_error"] == "E_IMAGE_DIGEST"
    assert rig.env().states == ("good", "bad")


def test_power_cuts_converge(rig: Rig, images: dict[str, Path]) -> None:
    """SIGKILL of QEMU during the image write, around the boot-env switch, and right after
    the new slot's first boot: every boot starts a valid signed slot, and the agent gets to
    the new version by itself."""
    be = rig.be
    vm = first_boot_idle(rig)
    rel = be.publish("2.0.0", images["2.0.0"], counter=2)
    be.assign(rel)
    be.relay.rate = 1024 * 1024  # a slow link: the write takes ~16 s
    # 1. during the image write
    vm.wait_for(r"progress slot=B bytes=\d+/\d+", BOOT)
    rig.cut(vm)
    assert rig.env().states[1] == "bad"  # out of rotation before the first byte was written
    vm = rig.start()
    b = rig.booted(vm)
    assert (b.grub_slot, b.version) == ("A", "1.0.0")
    # 2. the download resumes; cut as the last checkpoint is logged: the env switch is next
    be.relay.rate = None
    m = vm.wait_for(r"progress slot=B bytes=(\d+)/(\d+)", BOOT)
    first_progress = int(m[1])
    assert first_progress >= 2 * 1024 * 1024  # resumed after the committed MiB, not from 0
    vm.wait_for(r"progress slot=B bytes=(\d+)/\1\b", BOOT)
    rig.cut(vm)
    vm = rig.start()
    b = rig.booted(vm)
    assert b.version in ("1.0.0", "2.0.0")  # whichever: a valid signed slot
    if b.slot == "A":  # the cut was before the switch: the agent installs again
        vm.wait_for(r"rebooting: rebooting to start the installed image", BOOT)
        rig.finish(vm)
        vm = rig.start()
        b = rig.booted(vm)
    assert (b.slot, b.grub_state, b.version) == ("B", "pending", "2.0.0")
    # 3. right after the first boot of the new slot, before its self-test
    vm.wait_for(r"boot-check slot=B mode=test", BOOT)
    rig.cut(vm)
    vm = rig.start()
    b = rig.booted(vm)
    assert (b.slot, b.grub_state, b.version) == ("B", "pending", "2.0.0")  # its last try
    vm.wait_for(r"mark-good: slot B version 2\.0\.0 confirmed", BOOT)
    vm.wait_for(r"poll outcome=idle version=2\.0\.0", BOOT)
    rig.cut(vm)
    env = rig.env()
    assert env.order == ("B", "A") and env.states == ("good", "good")
    assert rig.counters()["security"] == 2
    assert all(bt.version in ("1.0.0", "2.0.0") for bt in rig.boots)
