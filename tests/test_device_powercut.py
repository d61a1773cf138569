"""Exhaustive power-cut test: cut at every flash operation of six paths, in four ways.

For each path the scenario is first run without faults to count its flash operations N.
Then, for every k in 0..N and every mode (before, torn+erased, torn+garbage, after), a fresh
copy of the starting flash image is driven through the path with power cut at operation k;
the device is then rebooted (a new Device on the same file) and does what a real one does —
boot, run its self-test, retry the update — while after *every* boot we check that:

* the bootloader chose a slot whose manifest is one of the signed ones and whose image on
  flash hashes to that manifest's digest (checked here independently of the bootloader);
* monotonic counters never decreased; OTP, identity and trust store are intact;
* the device eventually reaches the expected final state.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from otaguard.delta import create_patch
from otaguard.device.device import FLASH_FILE, Device
from otaguard.device.faults import FaultInjector, FaultPlan
from otaguard.device.lab import Lab, MemoryTransport, image_bytes
from otaguard.device.layout import LayoutConfig
from otaguard.device.slots import read_envelope
from otaguard.device.storage import Counters, Identity
from otaguard.errors import ErrorCode, OtaError, PowerCut
from tests.cutdisk import report

CFG = LayoutConfig(
    sector_size=4096,
    page_size=256,
    slot_size=6 * 4096,
    manifest_size=4096,
    bootloader_size=4096,
    records=(("counters", 1), ("trust", 1), ("identity", 1), ("staging", 1), ("agent", 1)),
)
CHECKPOINT = 8192
MODES = [("before", "erased"), ("torn", "erased"), ("torn", "garbage"), ("after", "erased")]
IDENTITY = Identity(b"device-key-blob" * 4, b"certificate-blob" * 8)
MIN_CUT_POINTS = {"install": 80, "delta": 80, "revert": 5, "watchdog": 5, "trust": 5, "revoke": 5}
TRIED: dict[str, int] = {}
RESUMED = [0]


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="otaguard.keys")


@dataclass
class World:
    lab: Lab
    v1: bytes
    v2: bytes
    m1: bytes
    m2: bytes
    m2d: bytes  # delta manifest for v2 (base v1)
    patch: bytes
    keylist_update: bytes
    base: Path  # device dir: v1 confirmed, booted
    pending: Path  # device dir: v2 installed, pending its test boot
    revoke_update: bytes = b""  # root-signed v3: only the extra key, the running key revoked
    checkpoint: int = CHECKPOINT

    def open(self, d: Path, inj: FaultInjector | None = None) -> Device:
        return Device(d, faults=inj, clock=lambda: self.lab.now, checkpoint=self.checkpoint)

    def transport(self) -> MemoryTransport:
        return MemoryTransport(self.m2, self.v2, chunk=1000)

    def delta_transport(self) -> MemoryTransport:
        return MemoryTransport(self.m2d, b"", patch=self.patch, chunk=1000)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    logging.getLogger("otaguard.keys").setLevel(logging.ERROR)
    root = tmp_path_factory.mktemp("powercut")
    lab = Lab()
    v1 = image_bytes(12 * 1024 + 100, 1)
    v2 = v1[:6000] + image_bytes(4 * 1024 + 200, 2) + v1[6000:]  # 16,684 B, shares most of v1
    base = root / "base"
    dev = lab.provision(base, v1, cfg=CFG, identity=IDENTITY, clock=lambda: lab.now)
    m1 = read_envelope(dev.flash, dev.layout.slots[0])
    assert m1 is not None
    assert dev.boot().version == "1.0.0"
    dev.close()
    m2 = lab.release(v2, version="1.1.0", seq=2, counter=2)
    patch = create_patch(v1, v2)
    m2d = lab.delta_release(v1, v2, patch, version="1.1.0", seq=2, counter=2)
    extra = Lab().op  # a second operational key to add
    update = lab.keylist_update([extra])
    revoke = lab.keylist_update([extra], keep_op=False, revoked=[lab.op.public_key.key_id])
    w = World(lab, v1, v2, m1, m2, m2d, patch, update, base, root / "pending", revoke)
    shutil.copytree(base, w.pending)
    with w.open(w.pending) as d:
        d.install(w.transport())
    return w


# --- invariants -----------------------------------------------------------------------------


class Observer:
    """Checks every boot and remembers the highest counters seen so far."""

    def __init__(self, w: World, start: Counters) -> None:
        self.w = w
        self.floor = start
        self.boots = 0

    def check(self, dev: Device, slot: int, version: str) -> None:
        w = self.w
        self.boots += 1
        region = dev.layout.slots[slot]
        env = read_envelope(dev.flash, region)
        image = {"1.0.0": w.v1, "1.1.0": w.v2}[version]
        assert env in {"1.0.0": (w.m1,), "1.1.0": (w.m2, w.m2d)}[version]
        on_flash = dev.flash.read(region.image_offset, len(image))
        assert hashlib.sha256(on_flash).digest() == hashlib.sha256(image).digest()
        c = dev.storage.counters()
        assert c.never_below(self.floor), (c, self.floor)
        self.floor = c
        otp = dev.storage.require_otp()
        assert otp.root_hash == w.lab.bundle.root_hash and otp.class_id == w.lab.class_id
        assert dev.storage.identity() == IDENTITY
        store = dev.storage.load_trust()
        assert store.keylist.raw in (w.lab.keylist, w.keylist_update, w.revoke_update)


def boot(dev: Device, obs: Observer) -> tuple[str, str]:
    r = dev.boot()  # raising here (E_NO_VALID_SLOT, E_STORAGE...) is a bricked device
    obs.check(dev, r.slot, r.version)
    return r.mode, r.version


# --- scenarios: the path under test, and how a real device carries on after a cut -----------


def path_install(w: World, d: Path, inj: FaultInjector | None) -> None:
    with w.open(d, inj) as dev:
        dev.install(w.transport())
    with w.open(d, inj) as dev:
        r = dev.boot()
        assert r.mode == "test"
        dev.confirm()
    with w.open(d, inj) as dev:
        assert dev.boot().version == "1.1.0"


def recover_install(w: World, d: Path, obs: Observer) -> None:
    for _ in range(8):
        with w.open(d) as dev:
            mode, version = boot(dev, obs)
            if mode == "test":
                assert version == "1.1.0"
                dev.confirm()  # self-test passes
                continue
            if version == "1.1.0":
                assert dev.storage.counters().security == 2
                return
            # the agent retries at the next check-in, resuming from its last checkpoint
            if dev.install(w.transport()).resumed_from > 0:
                RESUMED[0] += 1
    pytest.fail("device never reached 1.1.0")


def path_delta(w: World, d: Path, inj: FaultInjector | None) -> None:
    with w.open(d, inj) as dev:
        assert dev.install(w.delta_transport()).method == "delta"
    with w.open(d, inj) as dev:
        r = dev.boot()
        assert r.mode == "test"
        dev.confirm()
    with w.open(d, inj) as dev:
        assert dev.boot().version == "1.1.0"


def recover_delta(w: World, d: Path, obs: Observer) -> None:
    for _ in range(8):
        with w.open(d) as dev:
            mode, version = boot(dev, obs)
            if mode == "test":
                assert version == "1.1.0"
                dev.confirm()
                continue
            if version == "1.1.0":
                assert dev.storage.counters().security == 2
                return
            # a cut mid-apply: the agent restarts the delta from patch byte 0
            res = dev.install(w.delta_transport())
            assert (res.method, res.resumed_from) == ("delta", 0)
    pytest.fail("device never reached 1.1.0 via the delta")


def path_revert(w: World, d: Path, inj: FaultInjector | None) -> None:
    with w.open(d, inj) as dev:
        assert dev.boot().mode == "test"
        dev.reject()  # self-test failed
    with w.open(d, inj) as dev:
        assert dev.boot().version == "1.0.0"


def recover_revert(w: World, d: Path, obs: Observer) -> None:
    for _ in range(8):
        with w.open(d) as dev:
            mode, version = boot(dev, obs)
            if mode == "test":
                dev.reject()
                continue
            assert version == "1.0.0"
            assert dev.storage.counters().security == 1
            return
    pytest.fail("device never reverted to 1.0.0")


def path_watchdog(w: World, d: Path, inj: FaultInjector | None) -> None:
    for _ in range(3):
        with w.open(d, inj) as dev:
            assert dev.boot().mode == "test"  # ...and hangs: no confirm
    with w.open(d, inj) as dev:
        r = dev.boot()
        assert r.version == "1.0.0" and r.reverted == ErrorCode.WATCHDOG.value


def recover_watchdog(w: World, d: Path, obs: Observer) -> None:
    for _ in range(8):
        with w.open(d) as dev:
            mode, version = boot(dev, obs)
            if mode == "normal":
                assert version == "1.0.0"
                return
    pytest.fail("watchdog never reverted")


def path_trust(w: World, d: Path, inj: FaultInjector | None) -> None:
    with w.open(d, inj) as dev:
        assert dev.apply_keylist_update(w.keylist_update) == 2
    with w.open(d, inj) as dev:
        dev.boot()


def recover_trust(w: World, d: Path, obs: Observer) -> None:
    for _ in range(4):
        with w.open(d) as dev:
            boot(dev, obs)
            if dev.storage.load_trust().version == 2:
                assert dev.storage.counters().keylist_version == 2
                return
            try:
                dev.apply_keylist_update(w.keylist_update)
            except OtaError as err:
                assert err.code == ErrorCode.REPLAY
    pytest.fail("key-list update never landed")


def path_revoke(w: World, d: Path, inj: FaultInjector | None) -> None:
    """Emergency revocation of the key that signed the RUNNING firmware (torn key-list write)."""
    with w.open(d, inj) as dev:
        assert dev.apply_keylist_update(w.revoke_update) == 3
    with w.open(d, inj) as dev:
        dev.boot()


def recover_revoke(w: World, d: Path, obs: Observer) -> None:
    for _ in range(4):
        with w.open(d) as dev:
            assert boot(dev, obs) == ("normal", "1.0.0")  # boots from its record, either list
            if dev.storage.load_trust().version == 3:
                assert dev.storage.counters().keylist_version == 3
                with pytest.raises(OtaError) as exc:
                    dev.install(w.transport())  # signed by the revoked key
                assert exc.value.code == ErrorCode.KEY_REVOKED
                return
            dev.apply_keylist_update(w.revoke_update)
    pytest.fail("revocation never landed")


Path_ = Callable[[World, Path, FaultInjector | None], None]
Recover = Callable[[World, Path, Observer], None]
SCENARIOS: dict[str, tuple[str, Path_, Recover]] = {
    "install": ("base", path_install, recover_install),
    "delta": ("base", path_delta, recover_delta),
    "revert": ("pending", path_revert, recover_revert),
    "watchdog": ("pending", path_watchdog, recover_watchdog),
    "trust": ("base", path_trust, recover_trust),
    "revoke": ("base", path_revoke, recover_revoke),
}


def count_ops(w: World, name: str, tmp: Path) -> int:
    start, path, recover = SCENARIOS[name]
    d = tmp / f"{name}-count"
    shutil.copytree(getattr(w, start), d)
    inj = FaultInjector()
    path(w, d, inj)
    with w.open(d) as dev:
        obs = Observer(w, dev.storage.counters())
    recover(w, d, obs)  # the uninterrupted run also satisfies the final-state checks
    return inj.ops


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_cut_at_every_operation(world: World, name: str, tmp_path: Path) -> None:
    start, path, recover = SCENARIOS[name]
    n = count_ops(world, name, tmp_path)
    src = getattr(world, start)
    flash_image = (src / FLASH_FILE).read_bytes()
    with world.open(src) as dev:
        start_counters = dev.storage.counters()
    d = tmp_path / "case"
    shutil.copytree(src, d)
    tried = 0
    for k in range(n + 1):
        for mode, fill in MODES:
            (d / FLASH_FILE).write_bytes(flash_image)
            inj = FaultInjector(FaultPlan(k, mode, fill))  # type: ignore[arg-type]
            with contextlib.suppress(PowerCut):
                path(world, d, inj)
            assert inj.fired == (k < n)
            obs = Observer(world, start_counters)
            try:
                recover(world, d, obs)
            except (AssertionError, OtaError) as exc:
                raise AssertionError(f"{name}: cut at op {k}/{n} mode={mode}/{fill}") from exc
            assert obs.boots >= 1
            tried += 1
    TRIED[name] = tried
    report("flash-24KiB", name, n, n + 1, tried, True)
    if name == "install":
        print(f"power-cut[install]: {RESUMED[0]} recoveries resumed a partial download")
        assert RESUMED[0] > 0
    assert tried >= MIN_CUT_POINTS[name] * len(MODES)
