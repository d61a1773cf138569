"""Flash model, fault injector, power-cut-safe records and secure storage."""

from __future__ import annotations

import contextlib
import itertools
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otaguard.device.faults import FaultInjector, FaultPlan
from otaguard.device.flash import Flash, Geometry
from otaguard.device.layout import Layout, LayoutConfig, Region
from otaguard.device.records import Record
from otaguard.device.storage import Identity, OtpData, SecureStorage, new_huk
from otaguard.errors import ErrorCode, FlashError, OtaError, PowerCut

G = Geometry(sector_size=1024, page_size=128)


def flash(tmp_path: Path, faults: FaultInjector | None = None, **kw: object) -> Flash:
    return Flash(tmp_path / "f.bin", 8 * 1024, G, faults=faults, **kw)  # type: ignore[arg-type]


def test_fresh_flash_is_erased_and_sparse(tmp_path: Path) -> None:
    with flash(tmp_path) as f:
        assert f.read(0, 8192) == b"\xff" * 8192
    assert (tmp_path / "f.bin").stat().st_blocks * 512 < 8192  # sparse: nothing written


def test_program_requires_erased_flash_and_stays_in_a_page(tmp_path: Path) -> None:
    with flash(tmp_path) as f:
        f.program(0, b"\x00\x01")
        assert f.read(0, 3) == b"\x00\x01\xff"
        with pytest.raises(FlashError) as exc:
            f.program(0, b"\x00")
        assert exc.value.code == ErrorCode.FLASH
        with pytest.raises(FlashError):
            f.program(120, b"x" * 16)  # crosses a page boundary
        f.erase_sector(0)
        assert f.is_erased(0, 1024)
        f.program(0, b"\x55")
        with pytest.raises(FlashError):
            f.erase_sector(100)  # unaligned
        with pytest.raises(FlashError):
            f.read(8190, 4)  # outside the part


def test_protected_regions(tmp_path: Path) -> None:
    with flash(tmp_path, protected=((0, 1024, "ro"), (1024, 2048, "otp"))) as f:
        with pytest.raises(FlashError):
            f.program(0, b"x")
        with pytest.raises(FlashError):
            f.erase_sector(0)
        f.program(1024, b"otp")
        with pytest.raises(FlashError):
            f.erase_sector(1024)


def test_operations_are_counted_and_cut(tmp_path: Path) -> None:
    inj = FaultInjector(FaultPlan(2, "before"))
    with flash(tmp_path, inj) as f:
        f.erase_sector(0)
        f.program(0, b"a" * 128)
        with pytest.raises(PowerCut) as exc:
            f.program(128, b"b" * 128)
        assert exc.value.code == ErrorCode.POWER_CUT
        assert f.read(128, 128) == b"\xff" * 128
        f.program(128, b"b" * 128)  # the plan fires once
    assert inj.ops == 4


@pytest.mark.parametrize(
    ("mode", "fill"), [("torn", "erased"), ("torn", "garbage"), ("after", "erased")]
)
def test_torn_and_after_programs(tmp_path: Path, mode: str, fill: str) -> None:
    inj = FaultInjector(FaultPlan(0, mode, fill))  # type: ignore[arg-type]
    with flash(tmp_path, inj) as f:
        with pytest.raises(PowerCut):
            f.program(0, b"\x00" * 128)
        got = f.read(0, 128)
    if mode == "after":
        assert got == b"\x00" * 128
    else:
        assert got[:64] == b"\x00" * 64
        assert (got[64:] == b"\xff" * 64) == (fill == "erased")


@pytest.mark.parametrize("fill", ["erased", "garbage"])
def test_torn_erase_leaves_sector_partly_old(tmp_path: Path, fill: str) -> None:
    inj = FaultInjector(FaultPlan(2, "torn", fill))  # type: ignore[arg-type]
    with flash(tmp_path, inj) as f:
        f.program(0, b"\x00" * 128)
        f.program(1024 - 128, b"\x00" * 128)
        with pytest.raises(PowerCut):
            f.erase_sector(0)
        assert f.read(0, 512) == b"\xff" * 512  # first half erased
        tail = f.read(1024 - 128, 128)
    assert (tail == b"\x00" * 128) == (fill == "erased")  # second half: old, or garbage
    assert tail != b"\xff" * 128


def test_read_error_injection(tmp_path: Path) -> None:
    inj = FaultInjector()
    inj.add_read_error(500, 501)
    with flash(tmp_path, inj) as f:
        f.read(0, 500)
        with pytest.raises(FlashError) as exc:
            f.read(400, 200)
        assert exc.value.code == ErrorCode.FLASH


def test_existing_file_of_wrong_size_is_refused(tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(b"\0" * 100)
    with pytest.raises(FlashError):
        flash(tmp_path)


def test_layout_rejects_bad_geometry() -> None:
    with pytest.raises(OtaError):
        Layout(LayoutConfig(slot_size=1000))
    with pytest.raises(OtaError):
        Geometry(sector_size=1000)
    cfg = LayoutConfig()
    assert LayoutConfig.from_json(cfg.to_json()) == cfg
    lay = Layout(cfg)
    regions = lay.regions()
    for a, b in itertools.pairwise(regions):
        assert a.end == b.offset


# --- records ---------------------------------------------------------------------------------


def test_record_roundtrip_and_alternation(tmp_path: Path) -> None:
    with flash(tmp_path) as f:
        r = Record(f, Region("r", 0, 2048))
        assert r.read() is None and not r.written()
        r.write(b"one")
        r.write(b"two")
        r.write(b"three")
        assert r.read() == b"three"
        assert sorted(c.seq for c in r.copies()) == [2, 3]
        with pytest.raises(OtaError) as exc:
            r.write(b"x" * 2000)
        assert exc.value.code == ErrorCode.TOO_LARGE


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    old=st.binary(min_size=0, max_size=1500),
    new=st.binary(min_size=0, max_size=1500),
    cut=st.integers(0, 20),
    mode=st.sampled_from(
        [("before", "erased"), ("torn", "erased"), ("torn", "garbage"), ("after", "erased")]
    ),
    prior=st.integers(0, 3),
)
def test_record_write_cut_anywhere_leaves_old_or_new(
    tmp_path_factory: pytest.TempPathFactory,
    old: bytes,
    new: bytes,
    cut: int,
    mode: tuple[str, str],
    prior: int,
) -> None:
    d = tmp_path_factory.mktemp("rec")
    with flash(d) as f:
        r = Record(f, Region("r", 2048, 4096))
        for i in range(prior):
            r.write(b"p%d" % i)
        r.write(old)
    inj = FaultInjector(FaultPlan(cut, mode[0], mode[1]))  # type: ignore[arg-type]
    with flash(d, inj) as f:
        r = Record(f, Region("r", 2048, 4096))
        with contextlib.suppress(PowerCut):
            r.write(new)
    with flash(d) as f:
        got = Record(f, Region("r", 2048, 4096)).read()
    assert got in (old, new)
    if not inj.fired:
        assert got == new


# --- secure storage --------------------------------------------------------------------------


def storage(tmp_path: Path) -> tuple[Flash, SecureStorage]:
    lay = Layout(LayoutConfig())
    f = Flash(tmp_path / "s.bin", lay.size, lay.geometry, protected=lay.protected)
    return f, SecureStorage.on_flash(f, lay)


def test_otp_is_write_once(tmp_path: Path) -> None:
    f, s = storage(tmp_path)
    with f:
        assert s.otp() is None
        data = OtpData(b"\x01" * 32, uuid.uuid4(), uuid.uuid4(), "ctl-9", "rev-b", new_huk())
        s.program_otp(data)
        assert s.otp() == data
        with pytest.raises(OtaError) as exc:
            s.program_otp(data)
        assert exc.value.code == ErrorCode.OTP_WRITTEN


def test_counters_only_rise(tmp_path: Path) -> None:
    f, s = storage(tmp_path)
    with f:
        s.program_otp(OtpData(b"\x01" * 32, uuid.uuid4(), uuid.uuid4(), "m", "r", new_huk()))
        assert s.counters().as_dict() == {"security": 0, "sequence": 0, "keylist_version": 0}
        s.advance(security=3, sequence=7)
        for kw in ({"security": 2}, {"sequence": 6}, {"keylist_version": -1}):
            with pytest.raises(OtaError) as exc:
                s.advance(**kw)
            assert exc.value.code == ErrorCode.COUNTER_DECREASE
        s.advance(security=3)  # equal is fine
        c = s.catch_up(security=1, sequence=9)
        assert (c.security, c.sequence) == (3, 9)


def test_identity_and_unprovisioned_trust(tmp_path: Path) -> None:
    f, s = storage(tmp_path)
    with f:
        assert s.identity() is None
        ident = Identity(b"k" * 100, b"c" * 900)
        s.write_identity(ident)
        assert s.identity() == ident
        with pytest.raises(OtaError) as exc:
            s.load_trust()
        assert exc.value.code == ErrorCode.STATE  # OTP empty: not provisioned


def test_slot_reader_is_bounded(tmp_path: Path) -> None:
    from otaguard.device.slots import slot_reader

    lay = Layout(LayoutConfig())
    with Flash(tmp_path / "r.bin", lay.size, lay.geometry) as f:
        read = slot_reader(f, lay.slots[1])
        assert read(0, 4) == b"\xff" * 4
        with pytest.raises(OtaError) as exc:
            read(lay.slots[1].image_capacity - 2, 4)
        assert exc.value.code == ErrorCode.DELTA_BOUNDS
