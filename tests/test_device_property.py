"""Property test of the boot-state machine: random installs, boots, confirms, failed
self-tests, tampered images and power cuts never leave the device without a verified,
bootable slot, and never lower a monotonic counter."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otaguard.device.bootloader import verify_slot
from otaguard.device.device import Device
from otaguard.device.faults import FaultInjector, FaultPlan
from otaguard.device.lab import Lab, MemoryTransport, image_bytes
from otaguard.device.layout import LayoutConfig
from otaguard.errors import ErrorCode, OtaError, PowerCut

CFG = LayoutConfig(
    sector_size=1024,
    page_size=256,
    slot_size=8 * 1024,
    manifest_size=1024,
    bootloader_size=1024,
    records=(("counters", 1), ("trust", 2), ("identity", 1), ("staging", 1), ("agent", 1)),
)
OPS = ["install", "install-tampered", "boot-pass", "boot-fail", "boot-hang", "cut"]
EXPECTED_INSTALL_ERRORS = {ErrorCode.STATE, ErrorCode.IMAGE_DIGEST, ErrorCode.REPLAY}


@pytest.fixture(scope="module")
def lab() -> Lab:
    logging.getLogger("otaguard.keys").setLevel(logging.ERROR)
    return Lab()


@pytest.fixture(scope="module")
def base(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("prop") / "base"
    lab.provision(d, image_bytes(3000, 0), cfg=CFG, version="1.0.0", seq=1, counter=1).close()
    return d


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(OPS),
            st.integers(0, 40),
            st.sampled_from(
                [("before", "erased"), ("torn", "erased"), ("torn", "garbage"), ("after", "erased")]
            ),
            st.booleans(),
        ),
        min_size=1,
        max_size=14,
    )
)
def test_random_operation_sequences_keep_a_bootable_verified_slot(
    lab: Lab,
    base: Path,
    tmp_path_factory: pytest.TempPathFactory,
    steps: list[tuple[str, int, tuple[str, str], bool]],
) -> None:
    d = tmp_path_factory.mktemp("seq") / "dev"
    shutil.copytree(base, d)
    seq = 1
    security = 1
    floor = None
    plan: FaultPlan | None = None

    def open_dev() -> Device:
        inj = FaultInjector(plan) if plan is not None else None
        return Device(d, faults=inj, clock=lambda: lab.now, max_tries=2, checkpoint=2048)

    for op, k, (mode, fill), bump in steps:
        if op == "cut":
            plan = FaultPlan(k, mode, fill)  # type: ignore[arg-type]
            continue
        try:
            with open_dev() as dev:
                if op.startswith("install"):
                    seq += 1
                    security += int(bump)
                    img = image_bytes(2000 + 300 * seq, seq)
                    m = lab.release(img, version=f"1.0.{seq}", seq=seq, counter=security)
                    sent = img if op == "install" else img[:-1] + bytes([img[-1] ^ 1])
                    try:
                        dev.install(MemoryTransport(m, sent, chunk=700))
                    except OtaError as err:
                        if err.code == ErrorCode.POWER_CUT:
                            raise
                        assert err.code in EXPECTED_INSTALL_ERRORS, err
                else:
                    r = dev.boot()
                    if r.mode == "test" and op != "boot-hang":
                        dev.run_self_test(lambda _r, ok=(op == "boot-pass"): ok)
        except PowerCut:
            pass
        plan = None
        # invariants, checked on a freshly "rebooted" device without faults
        with Device(d, clock=lambda: lab.now, max_tries=2) as dev:
            c = dev.storage.counters()
            if floor is not None:
                assert c.never_below(floor), (floor, c)
            floor = c
            stt = dev.bootloader.bootstate.load()
            otp = dev.storage.require_otp()
            store = dev.bootloader.trust()
            verify_slot(
                dev.slots, dev.slots.slots[stt.active], store, otp, c, ref=stt.refs[stt.active]
            )
    with Device(d, clock=lambda: lab.now, max_tries=2) as dev:
        for _ in range(3):  # a final boot (plus watchdog boots) always lands on a verified image
            r = dev.boot()
            if r.mode == "normal":
                break
