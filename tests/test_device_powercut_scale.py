"""The exhaustive flash power-cut test (tests/test_device_powercut.py) on a realistic layout.

Same scenarios, same four cut modes, same checks after every boot; the part is what a real
device has: 1 MiB slots of 256 sectors of 4 KiB, 256-byte pages, a 960 KiB factory image that
fills most of its slot, and a checkpoint every 64 KiB. An install is then about 4,000 flash
operations. ``make test`` cuts at a deterministic sample of them (always including the first
and last, and every operation of the short scenarios); ``make powercut`` (part of ``make
soak``) sets ``OTAGUARD_POWERCUT_FULL=1`` and cuts at every one (docs/reliability.md).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import shutil
from pathlib import Path

import pytest

from otaguard.delta import create_patch
from otaguard.device.device import FLASH_FILE
from otaguard.device.faults import FaultInjector, FaultPlan
from otaguard.device.lab import Lab, image_bytes
from otaguard.device.layout import LayoutConfig
from otaguard.device.slots import read_envelope
from otaguard.errors import OtaError, PowerCut
from tests.cutdisk import report
from tests.test_device_powercut import (
    IDENTITY,
    MODES,
    RESUMED,
    SCENARIOS,
    Observer,
    World,
)

SLOT = 1024 * 1024
CFG = LayoutConfig(
    sector_size=4096,
    page_size=256,
    slot_size=SLOT,
    manifest_size=4096,
    bootloader_size=4096,
    records=(("counters", 1), ("trust", 1), ("identity", 1), ("staging", 1), ("agent", 1)),
)
CHECKPOINT = 64 * 1024
FULL = os.environ.get("OTAGUARD_POWERCUT_FULL") == "1"
SAMPLE = int(os.environ.get("OTAGUARD_POWERCUT_SAMPLE", "24"))  # cut points per scenario
# FULL: every STRIDE-th operation of the long scenarios (1 = every one), split into SHARDS
# tests so that pytest-xdist spreads one scenario over its workers
STRIDE = {
    "install": int(os.environ.get("OTAGUARD_POWERCUT_STRIDE_INSTALL", "1")),
    "delta": int(os.environ.get("OTAGUARD_POWERCUT_STRIDE_DELTA", "1")),
}
SHARDS = int(os.environ.get("OTAGUARD_POWERCUT_SHARDS", "1")) if FULL else 1
CASES = [(name, shard) for name in SCENARIOS for shard in range(SHARDS if name in STRIDE else 1)]
TOTALS: dict[str, int] = {}


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="otaguard.keys")


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    logging.getLogger("otaguard.keys").setLevel(logging.ERROR)
    root = tmp_path_factory.mktemp("powercut-1mib")
    lab = Lab()
    v1 = image_bytes(SLOT - 64 * 1024 - 300, 1)  # 960 KiB - 300 B
    v2 = v1[:6000] + image_bytes(8 * 1024, 2) + v1[6000 + 8 * 1024 :]
    base = root / "base"
    dev = lab.provision(base, v1, cfg=CFG, identity=IDENTITY, clock=lambda: lab.now)
    m1 = read_envelope(dev.flash, dev.layout.slots[0])
    assert m1 is not None
    assert dev.boot().version == "1.0.0"
    dev.close()
    m2 = lab.release(v2, version="1.1.0", seq=2, counter=2)
    patch = create_patch(v1, v2)
    m2d = lab.delta_release(v1, v2, patch, version="1.1.0", seq=2, counter=2)
    extra = Lab().op
    update = lab.keylist_update([extra])
    revoke = lab.keylist_update([extra], keep_op=False, revoked=[lab.op.public_key.key_id])
    w = World(lab, v1, v2, m1, m2, m2d, patch, update, base, root / "pending", revoke, CHECKPOINT)
    shutil.copytree(base, w.pending)
    with w.open(w.pending) as d:
        d.install(w.transport())
    return w


def cut_points(n: int, name: str, shard: int = 0) -> list[int]:
    """0..n (n is the no-fault control) in full (every STRIDE-th, this shard's share, always
    with both ends), or a deterministic sample with both ends."""
    if FULL:
        every = sorted({*range(0, n + 1, STRIDE.get(name, 1)), n - 1, n})
        return every[shard::SHARDS] if name in STRIDE else every
    if n + 1 <= SAMPLE:
        return list(range(n + 1))
    rng = random.Random(f"powercut-1mib/{name}")
    return sorted({0, n - 1, n, *rng.sample(range(1, n - 1), SAMPLE - 3)})


@pytest.mark.parametrize(("name", "shard"), CASES)
def test_cut_flash_at_scale(world: World, name: str, shard: int, tmp_path: Path) -> None:
    start, path, recover = SCENARIOS[name]
    src = getattr(world, start)
    d = tmp_path / "case"
    shutil.copytree(src, d)
    inj = FaultInjector()
    path(world, d, inj)
    n = inj.ops
    flash_image = (src / FLASH_FILE).read_bytes()
    with world.open(src) as dev:
        start_counters = dev.storage.counters()
    points = cut_points(n, name, shard)
    tried = 0
    resumed_before = RESUMED[0]
    for k in points:
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
                raise AssertionError(
                    f"{name}: BRICKED after cut at op {k}/{n} mode={mode}/{fill}"
                ) from exc
            assert obs.boots >= 1
            tried += 1
    TOTALS[name] = tried
    label = f"{name}/{shard + 1}of{SHARDS}" if name in STRIDE and SHARDS > 1 else name
    report("flash-1MiB", label, n, len(points), tried, FULL)
    if name == "install" and len(points) > 8:
        resumed = RESUMED[0] - resumed_before
        print(f"power-cut 1MiB[install]: {resumed} recoveries resumed a partial download")
        assert resumed > 0
    assert tried == len(points) * len(MODES)
