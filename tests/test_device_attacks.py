"""Every device-relevant threat of DESIGN §2: refused with its code, the inactive slot left
invalid, nothing marked pending, and the running firmware still boots."""

from __future__ import annotations

import hashlib
import logging
import shutil
from pathlib import Path

import pytest

from otaguard.crypto.software import SoftwareSigner, generate_private_key
from otaguard.device import records
from otaguard.device.device import FLASH_FILE, Device
from otaguard.device.faults import FaultInjector
from otaguard.device.lab import DAY, Lab, MemoryTransport, image_bytes
from otaguard.device.layout import LayoutConfig
from otaguard.device.records import Record
from otaguard.device.slots import read_envelope
from otaguard.errors import ErrorCode, OtaError
from otaguard.manifest.ids import class_id, vendor_id
from otaguard.trust.documents import sign_keylist

CFG = LayoutConfig(sector_size=4096, page_size=256, slot_size=12 * 4096, manifest_size=4096)
V1 = image_bytes(10_000, 1)
V2 = image_bytes(20_000, 2)


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="otaguard.keys")


@pytest.fixture(scope="module")
def lab() -> Lab:
    logging.getLogger("otaguard.keys").setLevel(logging.ERROR)
    return Lab()


@pytest.fixture(scope="module")
def base(lab: Lab, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("attacks") / "base"
    with lab.provision(d, V1, cfg=CFG, version="1.0.0", seq=5, counter=3) as dev:
        assert dev.boot().version == "1.0.0"
    return d


@pytest.fixture
def dev_dir(base: Path, tmp_path: Path) -> Path:
    d = tmp_path / "dev"
    shutil.copytree(base, d)
    return d


def open_dev(lab: Lab, d: Path, **kw: object) -> Device:
    return Device(d, clock=lambda: lab.now, **kw)  # type: ignore[arg-type]


def refused(
    lab: Lab, d: Path, transport: MemoryTransport, code: ErrorCode, *, downloaded: bool
) -> None:
    with open_dev(lab, d) as dev:
        with pytest.raises(OtaError) as exc:
            dev.install(transport)
        assert exc.value.code == code, exc.value
        st = dev.bootloader.bootstate.load()
        assert st.pending is None
        assert read_envelope(dev.flash, dev.layout.slots[st.inactive]) is None
        assert dev.storage.staging() is None
        assert dev.storage.agent_state().last_error == code.value
        assert {"event": "error", "error": code.value}.items() <= transport.events[-1].items()
    assert bool(transport.offsets) == downloaded  # conditions fail before any image byte
    with open_dev(lab, d) as dev:
        r = dev.boot()
        assert (r.mode, r.version, r.slot) == ("normal", "1.0.0", 0)


def test_valid_update_is_accepted(lab: Lab, dev_dir: Path) -> None:
    t = MemoryTransport(lab.release(V2, version="1.1.0", seq=6, counter=3), V2)
    with open_dev(lab, dev_dir) as dev:
        assert dev.install(t).version == "1.1.0"
    with open_dev(lab, dev_dir) as dev:
        assert dev.boot().mode == "test"


def test_tampered_image(lab: Lab, dev_dir: Path) -> None:
    bad = bytearray(V2)
    bad[12345] ^= 0x01
    t = MemoryTransport(lab.release(V2, version="1.1.0", seq=6, counter=3), bytes(bad))
    refused(lab, dev_dir, t, ErrorCode.IMAGE_DIGEST, downloaded=True)


def test_truncated_image(lab: Lab, dev_dir: Path) -> None:
    t = MemoryTransport(lab.release(V2, version="1.1.0", seq=6, counter=3), V2[:-1])
    refused(lab, dev_dir, t, ErrorCode.IMAGE_SIZE, downloaded=True)


def test_image_longer_than_manifest(lab: Lab, dev_dir: Path) -> None:
    t = MemoryTransport(lab.release(V2, version="1.1.0", seq=6, counter=3), V2 + b"\0" * 5000)
    refused(lab, dev_dir, t, ErrorCode.IMAGE_SIZE, downloaded=True)


def test_image_larger_than_slot(lab: Lab, dev_dir: Path) -> None:
    huge = image_bytes(CFG.slot_size, 9)  # slot minus manifest area < this
    t = MemoryTransport(lab.release(huge, version="1.1.0", seq=6, counter=3), huge)
    refused(lab, dev_dir, t, ErrorCode.SLOT_FULL, downloaded=False)


@pytest.mark.parametrize(
    ("kw", "code"),
    [
        ({"klass": class_id(vendor_id("hvac.example.com"), "ctl-7", "rev-b")}, ErrorCode.CLASS_ID),
        ({"klass": class_id(vendor_id("hvac.example.com"), "ctl-9", "rev-c")}, ErrorCode.CLASS_ID),
        ({"vendor": vendor_id("evil.example.net")}, ErrorCode.VENDOR_ID),
        ({"seq": 5}, ErrorCode.REPLAY),
        ({"seq": 4}, ErrorCode.REPLAY),
        ({"counter": 2}, ErrorCode.SECURITY_COUNTER),
        ({"min_version": "1.0.1"}, ErrorCode.MIN_VERSION),
        ({"expires": 1_800_000_000 - 1}, ErrorCode.EXPIRED),
    ],
)
def test_condition_failures_stop_before_download(
    lab: Lab, dev_dir: Path, kw: dict[str, object], code: ErrorCode
) -> None:
    args: dict[str, object] = {"version": "1.1.0", "seq": 6, "counter": 3, **kw}
    t = MemoryTransport(lab.release(V2, **args), V2)  # type: ignore[arg-type]
    expected = code
    if "vendor" in kw or "klass" in kw:
        # the lab key is scoped to the device's class only, so the signer-scope check inside
        # verification refuses it first (the pure condition is tested with a wider key below)
        expected = ErrorCode.KEY_SCOPE
    refused(lab, dev_dir, t, expected, downloaded=False)


def test_cross_model_manifest_signed_by_key_scoped_for_it(lab: Lab, dev_dir: Path) -> None:
    """A key legitimately authorized for another model too must not install it on this one."""
    other_class = class_id(lab.vendor_id, "ctl-7", "rev-a")
    wide = SoftwareSigner(generate_private_key("ed25519"))
    lab.keylist_version += 1
    update = sign_keylist(
        lab.root,
        version=lab.keylist_version,
        authorizations=[*lab.auths, lab.authorize(wide, class_ids=[lab.class_id, other_class])],
        issued_at=lab.now - DAY + 10,
    )
    with open_dev(lab, dev_dir) as dev:
        dev.apply_keylist_update(update)
    m = lab.release(V2, version="1.1.0", seq=6, counter=3, klass=other_class, signers=[wide])
    refused(lab, dev_dir, MemoryTransport(m, V2), ErrorCode.CLASS_ID, downloaded=False)


def test_unknown_key_is_suspect_and_reported_at_next_checkin(lab: Lab, dev_dir: Path) -> None:
    rogue = SoftwareSigner(generate_private_key("ed25519"))
    m = lab.release(V2, version="1.1.0", seq=6, counter=3, signers=[rogue])
    bad = MemoryTransport(m, V2, endpoint="https://mirror.evil.example/m")
    refused(lab, dev_dir, bad, ErrorCode.UNTRUSTED_KEY, downloaded=False)
    with open_dev(lab, dev_dir) as dev:
        sus = dev.storage.agent_state().suspects
        assert [s["endpoint"] for s in sus] == ["https://mirror.evil.example/m"]
        assert sus[0]["code"] == "E_UNTRUSTED_KEY"
        good = MemoryTransport(lab.release(V2, version="1.1.0", seq=6, counter=3), V2)
        dev.install(good)
        assert good.events[0]["event"] == "suspect-sources"
        assert good.events[0]["suspects"][0]["endpoint"] == "https://mirror.evil.example/m"
        assert dev.storage.agent_state().suspects == ()


def test_tampered_manifest_bytes(lab: Lab, dev_dir: Path) -> None:
    m = bytearray(lab.release(V2, version="1.1.0", seq=6, counter=3))
    # One bit of the signed image digest inside the manifest: the envelope still parses, and
    # the manifest digest is checked before any signature (manifest/verify.py order).
    m[bytes(m).index(hashlib.sha256(V2).digest())] ^= 0x40
    t = MemoryTransport(bytes(m), V2)
    with open_dev(lab, dev_dir) as dev, pytest.raises(OtaError) as exc:
        dev.install(t)
    assert exc.value.code == ErrorCode.DIGEST
    with open_dev(lab, dev_dir) as dev:
        assert len(dev.storage.agent_state().suspects) == 1
        assert dev.boot().version == "1.0.0"


def test_revoked_key(lab: Lab, dev_dir: Path) -> None:
    second = SoftwareSigner(generate_private_key("ed25519"))
    add = lab.keylist_update([second])
    revoke = lab.keylist_update([second], revoked=[second.public_key.key_id])
    with open_dev(lab, dev_dir) as dev:
        assert dev.apply_keylist_update(add) == lab.keylist_version - 1
        assert dev.apply_keylist_update(revoke) == lab.keylist_version
    m = lab.release(V2, version="1.1.0", seq=6, counter=3, signers=[second])
    refused(lab, dev_dir, MemoryTransport(m, V2), ErrorCode.KEY_REVOKED, downloaded=False)


def test_keylist_replay_and_revoking_the_running_key(lab: Lab, dev_dir: Path) -> None:
    second = SoftwareSigner(generate_private_key("ed25519"))
    add = lab.keylist_update([second])
    with open_dev(lab, dev_dir) as dev:
        version = dev.apply_keylist_update(add)
        with pytest.raises(OtaError) as exc:
            dev.apply_keylist_update(add)
        assert exc.value.code == ErrorCode.REPLAY
        # Dropping (even revoking) the key that signed the running firmware is allowed: the
        # confirmed slot boots from its boot record, not from the current key list.
        drop = lab.keylist_update([second], keep_op=False, revoked=[lab.op.public_key.key_id])
        assert dev.apply_keylist_update(drop) == version + 1
        assert dev.storage.counters().keylist_version == version + 1
    with open_dev(lab, dev_dir) as dev:
        assert dev.boot().version == "1.0.0"


def test_flash_read_error_during_install(lab: Lab, dev_dir: Path) -> None:
    with open_dev(lab, dev_dir) as dev:
        inactive = dev.layout.slots[1]
    inj = FaultInjector()
    inj.add_read_error(inactive.image_offset + 8192, inactive.image_offset + 8193)
    t = MemoryTransport(lab.release(V2, version="1.1.0", seq=6, counter=3), V2)
    with open_dev(lab, dev_dir, faults=inj) as dev:
        with pytest.raises(OtaError) as exc:
            dev.install(t)
        assert exc.value.code == ErrorCode.FLASH
        assert dev.bootloader.bootstate.load().pending is None
        assert read_envelope(dev.flash, inactive) is None
    with open_dev(lab, dev_dir) as dev:
        assert dev.boot().version == "1.0.0"


def test_flash_read_error_in_pending_slot_at_boot(lab: Lab, dev_dir: Path) -> None:
    t = MemoryTransport(lab.release(V2, version="1.1.0", seq=6, counter=3), V2)
    with open_dev(lab, dev_dir) as dev:
        dev.install(t)
        slot = dev.layout.slots[1]
    inj = FaultInjector()
    inj.add_read_error(slot.image_offset, slot.image_offset + 1)
    with open_dev(lab, dev_dir, faults=inj) as dev:
        r = dev.boot()
        assert (r.version, r.mode, r.reverted) == ("1.0.0", "normal", ErrorCode.FLASH.value)


def _flip(d: Path, addr: int) -> None:
    with (d / FLASH_FILE).open("r+b") as f:  # bytes are stored inverted; flipping is flipping
        f.seek(addr)
        b = f.read(1)
        f.seek(addr)
        f.write(bytes([b[0] ^ 0x10]))


def test_image_tampered_on_flash_after_install_is_never_booted(lab: Lab, dev_dir: Path) -> None:
    t = MemoryTransport(lab.release(V2, version="1.1.0", seq=6, counter=3), V2)
    with open_dev(lab, dev_dir) as dev:
        dev.install(t)
        addr = dev.layout.slots[1].image_offset + 777
    _flip(dev_dir, addr)
    with open_dev(lab, dev_dir) as dev:
        r = dev.boot()
        assert (r.version, r.reverted) == ("1.0.0", ErrorCode.IMAGE_DIGEST.value)
        assert dev.bootloader.bootstate.load().last_error == ErrorCode.IMAGE_DIGEST.value


def test_manifest_swapped_on_flash_is_never_booted(lab: Lab, dev_dir: Path) -> None:
    """A different, validly signed envelope in the slot is not the one the agent accepted."""
    t = MemoryTransport(lab.release(V2, version="1.1.0", seq=6, counter=3), V2)
    with open_dev(lab, dev_dir) as dev:
        dev.install(t)
        slot = dev.layout.slots[1]
        from otaguard.device.slots import write_envelope

        write_envelope(dev.flash, slot, lab.release(V2, version="1.1.1", seq=9, counter=3))
    with open_dev(lab, dev_dir) as dev:
        r = dev.boot()
        assert (r.version, r.reverted) == ("1.0.0", ErrorCode.DIGEST.value)


def test_active_slot_corrupted_falls_back_to_verified_other_slot(lab: Lab, dev_dir: Path) -> None:
    t = MemoryTransport(lab.release(V2, version="1.1.0", seq=6, counter=3), V2)
    with open_dev(lab, dev_dir) as dev:
        dev.install(t)
    with open_dev(lab, dev_dir) as dev:
        dev.boot()
        dev.confirm()
        addr = dev.layout.slots[1].image_offset + 5
    # the old slot's counter equals the device's (3), so it is still a valid fallback
    _flip(dev_dir, addr)
    with open_dev(lab, dev_dir) as dev:
        r = dev.boot()
        assert (r.version, r.mode, r.reverted) == ("1.0.0", "test", ErrorCode.IMAGE_DIGEST.value)


def test_both_slots_bad_is_no_valid_slot(lab: Lab, dev_dir: Path) -> None:
    with open_dev(lab, dev_dir) as dev:
        addr = dev.layout.slots[0].image_offset + 5
    _flip(dev_dir, addr)
    with open_dev(lab, dev_dir) as dev, pytest.raises(OtaError) as exc:
        dev.boot()
    assert exc.value.code == ErrorCode.NO_VALID_SLOT


def test_install_while_pending_is_refused(lab: Lab, dev_dir: Path) -> None:
    t = MemoryTransport(lab.release(V2, version="1.1.0", seq=6, counter=3), V2)
    with open_dev(lab, dev_dir) as dev:
        dev.install(t)
        with pytest.raises(OtaError) as exc:
            dev.install(t)
        assert exc.value.code == ErrorCode.STATE


# --- G1: raw-flash attacker vs the authenticated boot state and counters ---------------------
# The attacker can write any flash byte but cannot read the HUK fuse, so the best they can do
# is a record with a recomputed checksum (the unkeyed ``Record`` writer) or a MAC under a key
# of their own choosing. Neither may make the device boot unverified code or lower a counter.


def _plant_rogue_image(dev: Device) -> bytes:
    """Write a rogue-signed envelope and its image raw into slot B; returns the envelope."""
    from otaguard.device.slots import SlotWriter, write_envelope
    from otaguard.manifest.verify import decode_pinned

    rogue = SoftwareSigner(generate_private_key("ed25519"))
    evil = image_bytes(9_000, 66)
    env = Lab.release(_ROGUE_LAB, evil, version="6.6.6", seq=99, counter=9, signers=[rogue])
    info = decode_pinned(env).info
    slot = dev.layout.slots[1]
    w = SlotWriter(dev.flash, slot, info.image_size, info.digest_alg)
    w.write(evil)
    assert w.finish() == info.image_digest
    write_envelope(dev.flash, slot, env)
    return env


_ROGUE_LAB = Lab()


def _forge(
    rec: Record, payload: bytes, *, copy: int | None = None, key: bytes | None = None
) -> None:
    """Raw-write one copy of ``rec``: by default the free copy, with a higher sequence number,
    exactly as a genuine write would place it; its integrity field is the recomputed checksum
    (or, with ``key``, an HMAC under that guessed key)."""
    cur = rec.newest()
    if copy is None:
        copy = 0 if cur is None else 1 - cur.index
    seq = 1 if cur is None else cur.seq + 1
    if key is None:
        blob = records._HDR.pack(records.MAGIC, seq, len(payload), records._digest(seq, payload))
    else:
        tag = records._mac(key, seq, payload)
        blob = records._MAC_HDR.pack(records.MAC_MAGIC, seq, len(payload), tag)
    base = rec.region.offset + copy * rec.copy_size
    ss = rec.flash.geometry.sector_size
    rec.flash.erase_range(base, -(-(len(blob) + len(payload)) // ss) * ss)
    rec.flash.program_bytes(base, blob + payload)


def test_forged_boot_record_pointing_at_rogue_image_is_never_booted(
    lab: Lab, dev_dir: Path
) -> None:
    from otaguard.device.bootstate import BootState
    from otaguard.device.slots import envelope_ref

    _ROGUE_LAB.vendor_id, _ROGUE_LAB.class_id = lab.vendor_id, lab.class_id
    with open_dev(lab, dev_dir) as dev:
        env = _plant_rogue_image(dev)
        st = dev.bootloader.bootstate.load()
        forged = BootState(active=1, refs=(st.refs[0], envelope_ref(env)), boots=st.boots)
        # one forged copy (higher sequence, checksum recomputed): ignored, the genuine copy wins
        _forge(dev.bootloader.bootstate.record, forged.encode())
    with open_dev(lab, dev_dir) as dev:
        r = dev.boot()
        assert (r.version, r.slot, r.mode) == ("1.0.0", 0, "normal")
        # the status view does not believe the forged record either
        assert dev.status()["boot_state"]["active"] == "A"
    with open_dev(lab, dev_dir) as dev:
        # both copies forged: the boot state is unreadable and nothing boots at all
        rec = dev.bootloader.bootstate.record
        _forge(rec, forged.encode(), copy=0)
        _forge(rec, forged.encode(), copy=1)
    with open_dev(lab, dev_dir) as dev, pytest.raises(OtaError) as exc:
        dev.boot()
    assert exc.value.code == ErrorCode.STORAGE


def test_boot_record_macd_under_a_guessed_key_is_refused(lab: Lab, dev_dir: Path) -> None:
    """The attacker knows the record format and MAC construction, just not this device's HUK."""
    from otaguard.device.bootstate import BootState
    from otaguard.device.slots import envelope_ref
    from otaguard.device.storage import derive_record_key, new_huk

    _ROGUE_LAB.vendor_id, _ROGUE_LAB.class_id = lab.vendor_id, lab.class_id
    guessed = derive_record_key(new_huk(), "bootstate")
    with open_dev(lab, dev_dir) as dev:
        env = _plant_rogue_image(dev)
        forged = BootState(active=1, refs=(None, envelope_ref(env)))
        rec = dev.bootloader.bootstate.record
        _forge(rec, forged.encode(), key=guessed)
    with open_dev(lab, dev_dir) as dev:
        r = dev.boot()  # the genuine copy still wins
        assert (r.version, r.slot) == ("1.0.0", 0)
        rec = dev.bootloader.bootstate.record
        _forge(rec, forged.encode(), copy=0, key=guessed)
        _forge(rec, forged.encode(), copy=1, key=guessed)
    with open_dev(lab, dev_dir) as dev, pytest.raises(OtaError) as exc:
        dev.boot()
    assert exc.value.code == ErrorCode.STORAGE


def test_counter_record_rewritten_lower_is_refused(lab: Lab, dev_dir: Path) -> None:
    from otaguard import cbor

    t = MemoryTransport(lab.release(V2, version="1.1.0", seq=6, counter=4), V2)
    with open_dev(lab, dev_dir) as dev:
        dev.install(t)
    with open_dev(lab, dev_dir) as dev:
        dev.boot()
        dev.confirm()
        before = dev.storage.counters()
        assert before.security == 4
        # attacker: counters back to zero, checksum recomputed, in the copy a writer would use
        _forge(dev.storage.rec["counters"], cbor.dumps({1: 0, 2: 0, 3: 0}))
    with open_dev(lab, dev_dir) as dev:
        assert dev.storage.counters() == before
        addr = dev.layout.slots[1].image_offset + 5
    # with the counter intact, breaking 1.1.0 must not roll the device back to 1.0.0 (counter 3)
    _flip(dev_dir, addr)
    with open_dev(lab, dev_dir) as dev, pytest.raises(OtaError) as exc:
        dev.boot()
    assert exc.value.code == ErrorCode.NO_VALID_SLOT
    with open_dev(lab, dev_dir) as dev:
        rec = dev.storage.rec["counters"]
        _forge(rec, cbor.dumps({1: 0, 2: 0, 3: 0}), copy=0)
        _forge(rec, cbor.dumps({1: 0, 2: 0, 3: 0}), copy=1)
    # both copies forged: the counters are unreadable, and the device refuses to boot
    with open_dev(lab, dev_dir) as dev, pytest.raises(OtaError) as exc:
        dev.boot()
    assert exc.value.code == ErrorCode.STORAGE


def test_refused_manifest_keeps_the_fallback_image(lab: Lab, dev_dir: Path) -> None:
    """A manifest refused on its own (here: rollback) must not touch the inactive slot: after
    an update it holds the previous, still valid image, the device's fallback if the running
    one is ever damaged (regression: the refusal used to erase it)."""
    with open_dev(lab, dev_dir) as dev:
        dev.install(MemoryTransport(lab.release(V2, version="1.1.0", seq=6, counter=3), V2))
    with open_dev(lab, dev_dir) as dev:
        dev.boot()
        dev.confirm()
        old = dev.layout.slots[0]
        before = dev.flash.read(old.region.offset, old.region.size)
    rollback = MemoryTransport(lab.release(V1, version="0.9.0", seq=7, counter=2), V1)
    with open_dev(lab, dev_dir) as dev:
        with pytest.raises(OtaError) as exc:
            dev.install(rollback)
        assert exc.value.code == ErrorCode.SECURITY_COUNTER
        assert dev.flash.read(old.region.offset, old.region.size) == before
        addr = dev.layout.slots[1].image_offset + 5
    _flip(dev_dir, addr)  # the running image is damaged: the fallback still boots
    with open_dev(lab, dev_dir) as dev:
        r = dev.boot()
        assert (r.version, r.mode, r.reverted) == ("1.0.0", "test", ErrorCode.IMAGE_DIGEST.value)


def test_erased_counter_record_is_tamper_not_zero(lab: Lab, dev_dir: Path) -> None:
    """Erasing the counter record needs no key (an erased region has no MAC to check). It
    used to read back as counters = 0, and with the running image damaged the device then
    booted the older image its counter forbids. A provisioned device always has the record,
    so its absence is tamper: E_STORAGE, and the older image never runs."""
    t = MemoryTransport(lab.release(V2, version="1.1.0", seq=6, counter=4), V2)
    with open_dev(lab, dev_dir) as dev:
        dev.install(t)
    with open_dev(lab, dev_dir) as dev:
        dev.boot()
        dev.confirm()
        region = dev.storage.rec["counters"].region  # type: ignore[attr-defined]
        addr = dev.layout.slots[1].image_offset + 5
        dev.flash.erase_range(region.offset, region.size)  # raw flash: erase both copies
    _flip(dev_dir, addr)  # and damage the running 1.1.0 (counter 4)
    with open_dev(lab, dev_dir) as dev:
        with pytest.raises(OtaError) as exc:
            dev.storage.counters()
        assert exc.value.code == ErrorCode.STORAGE
        with pytest.raises(OtaError) as exc:
            dev.boot()  # never falls back to 1.0.0 (counter 3)
        assert exc.value.code == ErrorCode.STORAGE
        assert dev.bootloader.current is None
