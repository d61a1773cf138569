"""Device flows: install → test boot → confirm/revert, watchdog, resume, self-test hooks."""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path

import pytest

from otaguard.device.bootloader import BootResult
from otaguard.device.device import Device, Provisioning
from otaguard.device.lab import Lab, MemoryTransport, chunks, image_bytes
from otaguard.device.layout import LayoutConfig
from otaguard.device.selftest import command_self_test, constant
from otaguard.device.storage import Staging
from otaguard.device.transport import LocalFileTransport
from otaguard.errors import ErrorCode, OtaError

CFG = LayoutConfig(sector_size=4096, page_size=256, slot_size=16 * 4096, manifest_size=4096)
V1 = image_bytes(10_000, 1)
V2 = image_bytes(40_000, 2)
V3 = image_bytes(30_000, 3)


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="otaguard.keys")


@pytest.fixture(scope="module")
def lab() -> Lab:
    logging.getLogger("otaguard.keys").setLevel(logging.ERROR)
    return Lab(kind="p256")  # ECDSA P-256 operational key (Ed25519 is covered elsewhere)


@pytest.fixture(scope="module")
def base(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("boot") / "base"
    lab.provision(d, V1, cfg=CFG).close()
    return d


@pytest.fixture
def d(base: Path, tmp_path: Path) -> Path:
    out = tmp_path / "dev"
    shutil.copytree(base, out)
    return out


def dev(lab: Lab, d: Path, **kw: object) -> Device:
    return Device(d, clock=lambda: lab.now, **kw)  # type: ignore[arg-type]


def m2(lab: Lab) -> bytes:
    return lab.release(V2, version="2.0.0", seq=2, counter=2)


def test_full_cycle_confirm_raises_counters_and_old_slot_is_rollback_protected(
    lab: Lab, d: Path
) -> None:
    with dev(lab, d) as x:
        assert x.boot().version == "1.0.0"
        res = x.install(MemoryTransport(m2(lab), V2))
        assert (res.slot, res.version, res.resumed_from) == (1, "2.0.0", 0)
        assert x.status()["boot_state"]["pending"] == "B"
    with dev(lab, d) as x:
        r = x.boot()
        assert (r.mode, r.slot, r.version) == ("test", 1, "2.0.0")
        assert x.storage.counters().security == 1  # not raised before confirm
        assert x.run_self_test(constant(True)) == "confirmed"
        assert x.storage.counters().security == 2
    with dev(lab, d) as x:
        r = x.boot()
        assert (r.mode, r.slot) == ("normal", 1)
        st = x.status()
        assert st["slots"][0]["error"] == ErrorCode.SECURITY_COUNTER.value  # old image retired
        assert st["counters"] == {"security": 2, "sequence": 2, "keylist_version": 1}
        # next update goes into A
        x.install(MemoryTransport(lab.release(V3, version="3.0.0", seq=3, counter=2), V3))
    with dev(lab, d) as x:
        assert x.boot().slot == 0


def test_failed_self_test_reverts(lab: Lab, d: Path) -> None:
    with dev(lab, d) as x:
        x.install(MemoryTransport(m2(lab), V2))
    with dev(lab, d) as x:
        x.boot()
        assert x.run_self_test(constant(False)) == "reverted"
        assert x.storage.counters().security == 1
    with dev(lab, d) as x:
        r = x.boot()
        assert (r.mode, r.version) == ("normal", "1.0.0")
        st = x.status()
        assert st["last_boot_error"] == ErrorCode.SELF_TEST.value
        assert st["slots"][1]["valid"] is False  # the rejected slot was invalidated
        # the same release may be retried (sequence number was never consumed)
        x.install(MemoryTransport(m2(lab), V2))


def test_watchdog_reverts_after_n_unconfirmed_boots(lab: Lab, d: Path) -> None:
    with dev(lab, d, max_tries=2) as x:
        x.install(MemoryTransport(m2(lab), V2))
    for _ in range(2):
        with dev(lab, d, max_tries=2) as x:
            assert x.boot().mode == "test"
    with dev(lab, d, max_tries=2) as x:
        r = x.boot()
        assert (r.version, r.reverted) == ("1.0.0", ErrorCode.WATCHDOG.value)
        with pytest.raises(OtaError) as exc:
            x.confirm()
        assert exc.value.code == ErrorCode.STATE


def test_confirm_outside_test_boot_is_refused(lab: Lab, d: Path) -> None:
    with dev(lab, d) as x:
        with pytest.raises(OtaError) as exc:
            x.confirm()
        assert exc.value.code == ErrorCode.STATE
        x.boot()
        assert x.run_self_test(constant(True)) == "not-in-test"
        with pytest.raises(OtaError):
            x.reject()


def test_interrupted_download_resumes_from_checkpoint(lab: Lab, d: Path) -> None:
    t = MemoryTransport(m2(lab), V2, chunk=1000, drop_at=30_000)
    with dev(lab, d, checkpoint=8192) as x:
        with pytest.raises(OtaError) as exc:
            x.install(t)
        assert exc.value.code == ErrorCode.TRANSPORT
        stg = x.storage.staging()
        assert isinstance(stg, Staging) and stg.committed == 24576
        assert x.status()["last_error"] == ErrorCode.TRANSPORT.value
    with dev(lab, d, checkpoint=8192) as x:  # reboot in between: progress survives
        x.boot()
        res = x.install(t)
        assert res.resumed_from == 24576
        assert t.offsets == [0, 24576]
        assert x.storage.staging() is None
        assert x.status()["last_error"] is None
    with dev(lab, d) as x:
        assert x.boot().version == "2.0.0"


def test_resume_with_a_different_manifest_starts_over(lab: Lab, d: Path) -> None:
    with dev(lab, d, checkpoint=8192) as x:
        with pytest.raises(OtaError):
            x.install(MemoryTransport(m2(lab), V2, drop_at=20_000))
        other = lab.release(V3, version="2.0.1", seq=4, counter=2)
        t = MemoryTransport(other, V3)
        assert x.install(t).resumed_from == 0


def test_local_file_transport_and_report_log(lab: Lab, d: Path, tmp_path: Path) -> None:
    (tmp_path / "m.suit").write_bytes(m2(lab))
    (tmp_path / "i.bin").write_bytes(V2)
    log = tmp_path / "reports.jsonl"
    t = LocalFileTransport(tmp_path / "m.suit", tmp_path / "i.bin", report_log=log, chunk=3000)
    assert b"".join(t.open_image(39_000)) == V2[39_000:]
    with dev(lab, d) as x:
        x.install(t)
    assert '"installed"' in log.read_text()
    missing = LocalFileTransport(tmp_path / "nope.suit", tmp_path / "i.bin")
    with dev(lab, d) as x, pytest.raises(OtaError) as exc:
        x.install(missing)
    assert exc.value.code in (ErrorCode.TRANSPORT, ErrorCode.STATE)


def test_command_self_test(lab: Lab, d: Path, tmp_path: Path) -> None:
    ok = command_self_test(
        [sys.executable, "-c", "import os,sys; sys.exit(os.environ['OTAGUARD_VERSION'] != '2.0.0')"]
    )
    bad = command_self_test(f"{sys.executable} -c 'raise SystemExit(3)'")
    hang = command_self_test([sys.executable, "-c", "import time; time.sleep(5)"], timeout=0.2)
    fake = BootResult(1, "test", lab.info(V2, version="2.0.0", seq=2))
    assert ok(fake) is True
    assert bad(fake) is False
    assert hang(fake) is False
    assert command_self_test(["/nonexistent/health-check"])(fake) is False
    with dev(lab, d) as x:
        x.install(MemoryTransport(m2(lab), V2))
    with dev(lab, d) as x:
        x.boot()
        assert x.run_self_test(ok) == "confirmed"


def test_provisioning_refuses_mismatches(lab: Lab, tmp_path: Path, d: Path) -> None:
    with pytest.raises(OtaError) as exc:
        lab.provision(d, V1, cfg=CFG)
    assert exc.value.code == ErrorCode.EXISTS
    manifest = lab.release(V1, version="1.0.0", seq=1)
    prov = Provisioning(lab.bundle, lab.vendor_id, lab.class_id, lab.model, lab.hw_rev, manifest)
    with pytest.raises(OtaError) as exc:
        Device.create(tmp_path / "x", CFG, prov, chunks(V2[: len(V1)]))
    assert exc.value.code == ErrorCode.IMAGE_DIGEST
    assert not (tmp_path / "x" / "flash.bin").exists()  # nothing half-provisioned is left
    other = Lab()
    prov2 = Provisioning(other.bundle, lab.vendor_id, lab.class_id, "m", "r", manifest)
    with pytest.raises(OtaError) as exc:
        Device.create(tmp_path / "y", CFG, prov2, chunks(V1))
    assert exc.value.code == ErrorCode.UNTRUSTED_KEY


def test_trust_store_reverified_against_otp(lab: Lab, d: Path) -> None:
    other = Lab()
    with dev(lab, d) as x:
        x.storage.save_trust(other.bundle.store(), other.root.public_key)  # attacker swap
        with pytest.raises(OtaError) as exc:
            x.boot()
        assert exc.value.code == ErrorCode.STORAGE


def test_trust_verified_once_per_power_on_and_record(
    lab: Lab, d: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loads after the boot reuse its verification only for the very same record bytes; an
    update, a record rewritten behind the agent's back, or a reset is verified again."""
    from otaguard import cbor
    from otaguard.trust import store as trust_store

    verified: list[bytes] = []
    real = trust_store.parse_keylist

    def counting(data: bytes, *a: object, **kw: object) -> object:
        verified.append(data)
        return real(data, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(trust_store, "parse_keylist", counting)
    with dev(lab, d) as x:
        x.boot()
        assert len(verified) == 1
        x.bootloader.trust()
        x.storage.load_trust()
        x.checkin_facts()
        assert len(verified) == 1  # same record since power-on: reused
        assert x.apply_keylist_update(lab.keylist_update(version=2)) == 2
        n = len(verified)
        assert x.storage.load_trust().version == 2  # the new record: verified
        assert len(verified) == n + 1
        x.storage.load_trust()
        assert len(verified) == n + 1
        x.boot()  # a reset forgets it
        assert len(verified) == n + 2
        # A record with a broken signature, MAC-valid (written with the device's own record
        # key): refused although a good store was verified a moment ago.
        good = x.storage.load_trust()
        raw = bytearray(good.keylist.raw)
        raw[-5] ^= 0x01
        root = good.root.to_cose_key()
        x.storage.rec["trust"].write(cbor.dumps({1: root, 2: bytes(raw), 3: root, 4: 0}))
        with pytest.raises(OtaError) as exc:
            x.storage.load_trust()
        assert exc.value.code == ErrorCode.SIGNATURE


def test_trust_record_rolled_back_below_its_counter_is_refused(lab: Lab, d: Path) -> None:
    """G6: a genuine, validly signed but older key list written back raw is E_STORAGE."""
    v1 = lab.bundle.store()
    newer = lab.keylist_update(version=2)
    with dev(lab, d) as x:
        x.boot()
        assert x.apply_keylist_update(newer) == 2
        assert x.storage.counters().keylist_version == 2
        # Raw write of the v1 record (root-signed, matches OTP): only the counter catches it.
        x.storage.save_trust(v1, lab.root.public_key)
        assert x.storage.load_trust().version == 1  # the record itself still verifies
        with pytest.raises(OtaError) as exc:
            x.bootloader.trust()
        assert exc.value.code == ErrorCode.STORAGE
        assert x.storage.counters().keylist_version == 2  # not lowered to match
    with dev(lab, d) as x, pytest.raises(OtaError) as exc:
        x.boot()
    assert exc.value.code == ErrorCode.STORAGE
