"""Power cuts at every file operation of the Linux backend (device/linux/), with GRUB modelled.

The device is the Linux agent on files standing in for its partitions (1 MiB slot "block
devices", the data partition's state directory, the ESP's two env copies). Each scenario is
run once under :class:`tests.cutdisk.CutDisk` to count its file operations *N* (record
temp-file writes, fsyncs, renames, directory fsyncs, GRUB env sector writes — including the
tries GRUB counts down itself —, slot ``pwrite``s, outbox appends); then for every *k* and
every way a power loss can leave the disk (the cut operation not done / torn / done, and of
the writes not yet made durable by an fsync: all, half or none reached the disk), a fresh copy
of the starting disks is driven through the path and cut at *k*, and the machine is powered on
again and again as a real one would be: GRUB picks a slot from its env (counting a pending
slot's tries down), the agent's boot check runs, the self-test passes or fails as the scenario
says, the agent retries the update. After every power-on:

* the slot GRUB started holds one of the signed envelopes and an image that hashes to it
  (checked here, independently of the agent) — a device that starts anything else, or that
  the boot check cannot bring up (E_NO_VALID_SLOT, E_STORAGE), is *bricked*;
* the monotonic counters never went down;
* the scenario reaches its final state.

``make test`` runs a deterministic sample of the cut points; ``make powercut`` (part of
``make soak``) runs all of them (docs/reliability.md has the numbers).
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from otaguard.device.device import Provisioning
from otaguard.device.lab import Lab, MemoryTransport, chunks, image_bytes
from otaguard.device.linux.config import AgentConfig
from otaguard.device.linux.grubenv import SLOTS, decode_block, encode_block
from otaguard.device.linux.system import LinuxDevice, RebootRequested, open_storage
from otaguard.device.storage import Counters
from otaguard.errors import ErrorCode, OtaError, PowerCut
from tests.cutdisk import CutDisk, CutPlan, report

SLOT = 1024 * 1024
CHECKPOINT = 64 * 1024
MAX_TRIES = 3
PIN = "ab" * 32
FULL = os.environ.get("OTAGUARD_POWERCUT_FULL") == "1"
SAMPLE = int(os.environ.get("OTAGUARD_POWERCUT_SAMPLE", "12"))  # cut points per scenario
TOTALS: dict[str, int] = {}


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="otaguard.keys")


def write_config(d: Path) -> Path:
    text = (
        f'[server]\nurl = "https://127.0.0.1:8443"\nspki_pins = ["{PIN}"]\n'
        f'[device]\nstate_dir = "{d / "state"}"\nrun_dir = "{d / "run"}"\n'
        f'slot_a = "{d / "slot-a.img"}"\nslot_b = "{d / "slot-b.img"}"\n'
        f"max_tries = {MAX_TRIES}\ncheckpoint = {CHECKPOINT}\n"
        f'[bootloader]\ngrubenv = ["{d / "esp" / "grubenv.0"}", "{d / "esp" / "grubenv.1"}"]\n'
        f'cmdline = "{d / "cmdline"}"\n'
    )
    p = d / "agent.toml"
    p.write_text(text)
    return p


@dataclass
class World:
    lab: Lab
    v1: bytes
    v2: bytes
    m1: bytes
    m2: bytes
    keylist_update: bytes
    base: Path  # disks: v1 provisioned and booted once
    pending: Path  # disks: v2 installed into B, pending its first boot

    def transport(self) -> MemoryTransport:
        return MemoryTransport(self.m2, self.v2, chunk=16 * 1024)

    def signed(self) -> dict[bytes, bytes]:
        """envelope -> the image it signs"""
        return {self.m1: self.v1, self.m2: self.v2}


def disks(d: Path) -> None:
    for n in ("state", "esp", "run"):
        (d / n).mkdir(parents=True)
    for s in ("a", "b"):
        with (d / f"slot-{s}.img").open("wb") as f:
            f.truncate(SLOT)


class Machine:
    """The disks in ``d`` plus a power switch: each power-on is GRUB, then the boot check."""

    def __init__(self, w: World, d: Path) -> None:
        self.w = w
        self.d = d
        self.cfg = AgentConfig.load(d / "agent.toml")

    def grub(self) -> int:
        """files/grub.cfg, step by step (its save_env writes go through the cut disk too)."""
        copies = self.cfg.grubenv

        def load(i: int) -> dict[str, str] | None:
            try:
                with copies[i].open("rb") as f:
                    v = decode_block(f.read(1025))
            except (OSError, OtaError):
                return None
            return v if v.get("OG_VALID") == "1" else None

        env = load(0) or load(1) or {"OG_ORDER": "A B", "OG_A_STATE": "good", "OG_B_STATE": "good"}
        order = ("B", "A") if env.get("OG_ORDER") == "B A" else ("A", "B")
        for s in order:
            state = env.get(f"OG_{s}_STATE", "")
            tries = env.get(f"OG_{s}_TRIES", "0")
            n = int(tries) if tries in tuple("0123456789") else 0
            if state == "good":
                return SLOTS.index(s)
            if state == "pending" and n:
                for c in copies:
                    save_env(c, f"OG_{s}_TRIES", str(n - 1))
                return SLOTS.index(s)
        for s in order:
            if env.get(f"OG_{s}_STATE", "") != "bad":
                return SLOTS.index(s)
        return 0

    def power_on(self, obs: Observer) -> tuple[LinuxDevice | None, str, str]:
        """GRUB starts a slot, the boot check runs; (device, mode, version) or (None, ...)
        when the boot check wants the other slot (a reboot)."""
        for f in (self.d / "run").glob("*"):
            f.unlink()  # RAM
        slot = self.grub()
        obs.started(self, slot)
        (self.d / "cmdline").write_text(f"otaguard.slot={SLOTS[slot]}\n")
        dev = LinuxDevice(self.cfg, clock=lambda: self.w.lab.now)
        try:
            res = dev.assess()  # raising anything but RebootRequested here is a brick
        except RebootRequested:
            return None, "reboot", ""
        assert res.info is not None
        obs.counters(dev)
        return dev, res.mode, res.info.version


def save_env(path: Path, name: str, value: str) -> None:
    """GRUB's save_env: rewrite one variable of a valid block in place (one sector write)."""
    try:
        with path.open("rb") as f:
            v = decode_block(f.read(1025))
        v[name] = value
        block = encode_block(v)
    except (OSError, OtaError):
        return  # GRUB ignores a failed save (grub.cfg: og_save_tries)
    fd = os.open(path, os.O_RDWR)
    try:
        os.pwrite(fd, block, 0)
        os.fsync(fd)
    finally:
        os.close(fd)


class Observer:
    """Checks every power-on and remembers the highest counters seen."""

    def __init__(self, w: World, floor: Counters) -> None:
        self.w = w
        self.floor = floor
        self.boots = 0

    def started(self, m: Machine, slot: int) -> None:
        self.boots += 1
        env = (m.d / "state" / f"slot-{SLOTS[slot]}.suit").read_bytes()
        signed = self.w.signed()
        assert env in signed, f"GRUB started slot {SLOTS[slot]} without a signed envelope"
        image = signed[env]
        with (m.d / f"slot-{SLOTS[slot].lower()}.img").open("rb") as f:
            on_disk = f.read(len(image))
        assert hashlib.sha256(on_disk).digest() == hashlib.sha256(image).digest()

    def counters(self, dev: LinuxDevice) -> None:
        c = dev.storage.counters()
        assert c.never_below(self.floor), (c, self.floor)
        self.floor = c


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    logging.getLogger("otaguard.keys").setLevel(logging.ERROR)
    root = tmp_path_factory.mktemp("linux-powercut")
    lab = Lab(now=int(time.time()))
    v1 = image_bytes(SLOT - 64 * 1024 - 300, 1)  # 960 KiB - 300 B in a 1 MiB slot
    v2 = v1[:6000] + image_bytes(8 * 1024, 2) + v1[6000 + 8 * 1024 :]
    m1 = lab.release(v1, version="1.0.0", seq=1, counter=1)
    m2 = lab.release(v2, version="1.1.0", seq=2, counter=2)
    update = lab.keylist_update([Lab().op])
    base = root / "base"
    disks(base)
    write_config(base)
    cfg = AgentConfig.load(base / "agent.toml")
    prov = Provisioning(lab.bundle, lab.vendor_id, lab.class_id, lab.model, lab.hw_rev, m1)
    LinuxDevice(cfg, running=0, provisioning=True).provision(prov, chunks(v1))
    w = World(lab, v1, v2, m1, m2, update, base, root / "pending")
    obs = Observer(w, Counters())
    dev, mode, version = Machine(w, base).power_on(obs)
    assert dev is not None and (mode, version) == ("normal", "1.0.0")
    copy_disks(base, w.pending)
    dev, _, _ = Machine(w, w.pending).power_on(obs)
    assert dev is not None
    dev.install(w.transport())
    return w


def copy_disks(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    text = (dst / "agent.toml").read_text().replace(str(src), str(dst))
    (dst / "agent.toml").write_text(text)


# --- scenarios ----------------------------------------------------------------------------


def run_install(w: World, m: Machine, obs: Observer) -> None:
    dev, mode, _ = m.power_on(obs)
    assert dev is not None and mode == "normal"
    dev.install(w.transport())
    dev, mode, version = m.power_on(obs)
    assert dev is not None and (mode, version) == ("test", "1.1.0")
    assert dev.run_self_test(lambda _b: True) == "confirmed"
    dev, mode, version = m.power_on(obs)
    assert (mode, version) == ("normal", "1.1.0")


def recover_install(w: World, m: Machine, obs: Observer) -> None:
    for _ in range(12):
        dev, mode, version = m.power_on(obs)
        if dev is None:
            continue
        if mode == "test":
            assert version == "1.1.0"
            dev.run_self_test(lambda _b: True)
            continue
        if version == "1.1.0":
            assert dev.storage.counters().security == 2
            return
        dev.install(w.transport())  # the agent's next check-in: resumes from its checkpoint
    pytest.fail("device never reached 1.1.0")


def run_revert(w: World, m: Machine, obs: Observer) -> None:
    dev, mode, _ = m.power_on(obs)
    assert dev is not None and mode == "test"
    assert dev.run_self_test(lambda _b: False) == "reverted"
    dev, mode, version = m.power_on(obs)
    if dev is None:
        dev, mode, version = m.power_on(obs)
    assert (mode, version) == ("normal", "1.0.0")


def recover_revert(w: World, m: Machine, obs: Observer) -> None:
    for _ in range(12):
        dev, mode, version = m.power_on(obs)
        if dev is None:
            continue
        if mode == "test":
            dev.run_self_test(lambda _b: False)
            continue
        assert version == "1.0.0"
        assert dev.storage.counters().security == 1
        return
    pytest.fail("device never reverted to 1.0.0")


def run_watchdog(w: World, m: Machine, obs: Observer) -> None:
    """The new image hangs before its self-test: GRUB counts its tries down, then gives up."""
    for _ in range(MAX_TRIES):
        _dev, mode, _ = m.power_on(obs)
        assert mode == "test"
    _dev, mode, version = m.power_on(obs)
    assert (mode, version) == ("normal", "1.0.0")


def recover_watchdog(w: World, m: Machine, obs: Observer) -> None:
    for _ in range(MAX_TRIES + 8):
        _dev, mode, version = m.power_on(obs)
        if mode == "normal":
            assert version == "1.0.0"
            return
    pytest.fail("GRUB never gave up on the hanging image")


def run_trust(w: World, m: Machine, obs: Observer) -> None:
    dev, _, _ = m.power_on(obs)
    assert dev is not None
    assert dev.apply_keylist_update(w.keylist_update) == 2
    m.power_on(obs)


def recover_trust(w: World, m: Machine, obs: Observer) -> None:
    for _ in range(6):
        dev, _, _ = m.power_on(obs)
        if dev is None:
            continue
        if dev.storage.load_trust().version == 2:
            assert dev.storage.counters().keylist_version == 2
            return
        try:
            dev.apply_keylist_update(w.keylist_update)
        except OtaError as err:
            assert err.code == ErrorCode.REPLAY
    pytest.fail("key-list update never landed")


Run = Callable[[World, Machine, Observer], None]
SCENARIOS: dict[str, tuple[str, Run, Run]] = {
    "install": ("base", run_install, recover_install),
    "revert": ("pending", run_revert, recover_revert),
    "watchdog": ("pending", run_watchdog, recover_watchdog),
    "trust": ("base", run_trust, recover_trust),
}


def roots(d: Path) -> tuple[Path, ...]:
    return (d / "state", d / "esp", d / "slot-a.img", d / "slot-b.img")


def start_counters(w: World, src: Path) -> Counters:
    return open_storage(src / "state").counters()


def count_ops(w: World, name: str, tmp: Path) -> CutDisk:
    """The uncut run: its operations, and for each the distinct ways a cut can leave it."""
    start, run, _ = SCENARIOS[name]
    d = tmp / f"{name}-count"
    copy_disks(getattr(w, start), d)
    disk = CutDisk(roots(d))
    with disk.active():
        run(w, Machine(w, d), Observer(w, start_counters(w, d)))
    return disk


def cut_points(n: int, name: str) -> list[int]:
    """Every operation (FULL), or a deterministic sample that always includes both ends."""
    if FULL or n <= SAMPLE:
        return list(range(n))
    rng = random.Random(f"linux-powercut/{name}")
    return sorted({0, n - 1, *rng.sample(range(1, n - 1), SAMPLE - 2)})


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_linux_cut_at_file_operations(world: World, name: str, tmp_path: Path) -> None:
    start, run, recover = SCENARIOS[name]
    traced = count_ops(world, name, tmp_path)
    n = traced.ops
    src = getattr(world, start)
    floor = start_counters(world, src)
    d = tmp_path / "case"
    tried = 0
    points = cut_points(n, name)
    for k in points:
        for mode, keep in traced.cases(k):
            copy_disks(src, d)
            disk = CutDisk(roots(d), CutPlan(k, mode, keep))
            obs = Observer(world, floor)
            try:
                with disk.active():
                    run(world, Machine(world, d), obs)
            except PowerCut:
                pass
            except (AssertionError, OtaError) as exc:
                raise AssertionError(f"{name}: before the cut at {k}/{n} {mode}/{keep}") from exc
            assert disk.fired
            try:
                recover(world, Machine(world, d), obs)
            except (AssertionError, OtaError) as exc:
                raise AssertionError(f"{name}: BRICKED after cut at {k}/{n} {mode}/{keep}") from exc
            tried += 1
    TOTALS[name] = tried
    print(f"\nlinux[{name}] file operations by kind: {traced.kinds}")
    report("linux-files", name, n, len(points), tried, FULL)
    assert tried >= len(points) * 2
