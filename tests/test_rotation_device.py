"""Key rotation and revocation on the device: key-list updates, the boot record, the updater.

Everything here runs on simulated flash devices (no server): the server/mTLS side is in
``test_rotation_incident.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otaguard.crypto.software import SoftwareSigner, generate_private_key
from otaguard.device.device import Device
from otaguard.device.lab import DAY, Lab, MemoryTransport, image_bytes
from otaguard.device.layout import LayoutConfig
from otaguard.device.updater import Updater
from otaguard.errors import ErrorCode, OtaError
from otaguard.trust.bundle import TrustBundle
from otaguard.trust.documents import issue_authorization, sign_keylist, single_key_keylist
from otaguard.trust.model import Role, Scope

CFG = LayoutConfig(slot_size=64 * 1024, manifest_size=4096)
V1 = image_bytes(20_000, 1)
V2 = image_bytes(24_000, 2)
V3 = image_bytes(22_000, 3)


def new_key() -> SoftwareSigner:
    return SoftwareSigner(generate_private_key("ed25519"))


@pytest.fixture
def lab() -> Lab:
    return Lab()


def device(lab: Lab, d: Path, **kw: Any) -> Device:
    return Device(d, clock=kw.pop("clock", lambda: lab.now), checkpoint=8192, **kw)


@pytest.fixture
def dev_dir(lab: Lab, tmp_path: Path) -> Path:
    d = tmp_path / "dev"
    lab.provision(d, V1, cfg=CFG, checkpoint=8192).close()
    return d


def code_of(fn: Any, *args: Any) -> ErrorCode:
    with pytest.raises(OtaError) as exc:
        fn(*args)
    return exc.value.code


def boots(lab: Lab, d: Path) -> str:
    with device(lab, d) as dev:
        r = dev.boot()
        assert r.mode == "normal"
        return r.version


def rotate_in(lab: Lab, new: SoftwareSigner) -> bytes:
    """Root-signed list adding ``new`` next to the current key (runbook step 2)."""
    return lab.keylist_update([new])


def rotate_out(lab: Lab, new: SoftwareSigner, *, by: Any = None) -> bytes:
    """Final list: only ``new``, the old key revoked (runbook step 5)."""
    return lab.keylist_update([new], keep_op=False, revoked=[lab.op.public_key.key_id], by=by)


# --- revocation vs. the running firmware and staged downloads ----------------------------------
def test_running_firmware_survives_revocation_and_new_key_patch_installs(
    lab: Lab, dev_dir: Path
) -> None:
    b = new_key()
    with device(lab, dev_dir) as dev:
        dev.boot()
        assert dev.apply_keylist_update(rotate_in(lab, b)) == 2
        assert dev.apply_keylist_update(rotate_out(lab, b)) == 3
    assert boots(lab, dev_dir) == "1.0.0"  # signed by the revoked key A, still boots
    with device(lab, dev_dir) as dev:
        assert dev.status()["slots"][0]["valid"] is True
        old = lab.release(V2, version="1.1.0", seq=6, counter=2)  # signed with revoked A
        assert code_of(dev.install, MemoryTransport(old, V2)) == ErrorCode.KEY_REVOKED
        patch = lab.release(V2, version="1.1.0", seq=6, counter=2, signers=[b])
        dev.install(MemoryTransport(patch, V2))
        assert dev.boot().mode == "test"
        dev.confirm()
    assert boots(lab, dev_dir) == "1.1.0"


def test_revocation_refuses_a_download_staged_before_it(lab: Lab, dev_dir: Path) -> None:
    b = new_key()
    m = lab.release(V2, version="1.1.0", seq=6, counter=2)  # signed with A
    with device(lab, dev_dir) as dev:
        dev.boot()
        dev.apply_keylist_update(rotate_in(lab, b))
        t = MemoryTransport(m, V2, drop_at=12_000)
        assert code_of(dev.install, t) == ErrorCode.TRANSPORT
        staged = dev.storage.staging()
        assert staged is not None and staged.committed > 0  # half downloaded, resumable
        dev.apply_keylist_update(rotate_out(lab, b))  # emergency revocation of A arrives
        assert code_of(dev.install, MemoryTransport(m, V2)) == ErrorCode.KEY_REVOKED
        assert dev.storage.staging() is None  # the staged bytes were thrown away
    assert boots(lab, dev_dir) == "1.0.0"


def test_revocation_rejects_an_installed_but_not_booted_image(lab: Lab, dev_dir: Path) -> None:
    b = new_key()
    with device(lab, dev_dir) as dev:
        dev.boot()
        dev.apply_keylist_update(rotate_in(lab, b))
        dev.install(MemoryTransport(lab.release(V2, version="1.1.0", seq=6, counter=2), V2))
        assert dev.bootloader.bootstate.load().pending == 1
        dev.apply_keylist_update(rotate_out(lab, b))
    with device(lab, dev_dir) as dev:
        r = dev.boot()
        assert (r.mode, r.version, r.reverted) == ("normal", "1.0.0", "E_KEY_REVOKED")
        assert dev.bootloader.bootstate.load().pending is None


# --- bad key-list updates ----------------------------------------------------------------------
def test_bad_keylist_updates_each_refused_with_its_code(lab: Lab, dev_dir: Path) -> None:
    b, rogue, fw_only = new_key(), new_key(), new_key()
    fw_auth = issue_authorization(
        lab.root,
        fw_only.public_key,
        roles={Role.FIRMWARE},
        scopes=[Scope(lab.vendor_id)],
        not_before=lab.now - DAY,
        not_after=lab.now + 100 * DAY,
    )
    add_b = rotate_in(lab, b)
    with device(lab, dev_dir) as dev:
        dev.boot()
        assert dev.apply_keylist_update(add_b) == 2
        # replayed (same, then older version)
        assert code_of(dev.apply_keylist_update, add_b) == ErrorCode.REPLAY
        old = lab.keylist_update([], version=1)
        assert code_of(dev.apply_keylist_update, old) == ErrorCode.REPLAY
        # adding a key outside the root's authorization: B (keylist role) vouches for rogue
        self_auth = issue_authorization(
            b,
            rogue.public_key,
            roles={Role.FIRMWARE},
            scopes=[Scope(lab.vendor_id)],
            not_before=lab.now - DAY,
            not_after=lab.now + 100 * DAY,
        )
        outside = sign_keylist(
            b, version=9, authorizations=[*lab.auths, self_auth], issued_at=lab.now
        )
        assert code_of(dev.apply_keylist_update, outside) == ErrorCode.UNTRUSTED_KEY
        # signed by a key without the keylist role
        with_fw = sign_keylist(
            lab.root, version=3, authorizations=[*lab.auths, fw_auth], issued_at=lab.now
        )
        assert dev.apply_keylist_update(with_fw) == 3
        by_fw = sign_keylist(fw_only, version=4, authorizations=lab.auths, issued_at=lab.now)
        assert code_of(dev.apply_keylist_update, by_fw) == ErrorCode.KEY_ROLE
        # signed by an unknown key
        by_rogue = sign_keylist(rogue, version=4, authorizations=lab.auths, issued_at=lab.now)
        assert code_of(dev.apply_keylist_update, by_rogue) == ErrorCode.UNTRUSTED_KEY
        # removing the last key (every key revoked / no key at all)
        empty = sign_keylist(lab.root, version=4, authorizations=[], issued_at=lab.now)
        assert code_of(dev.apply_keylist_update, empty) == ErrorCode.EMPTY_KEYLIST
        all_revoked = sign_keylist(
            lab.root,
            version=4,
            authorizations=lab.auths,
            revoked={lab.op.public_key.key_id},
            issued_at=lab.now,
        )
        assert code_of(dev.apply_keylist_update, all_revoked) == ErrorCode.EMPTY_KEYLIST
        # signed by a revoked key: revoke B (root), then B tries to sign a list
        lab.keylist_version = 3
        revoke_b = lab.keylist_update([], revoked=[b.public_key.key_id])
        assert dev.apply_keylist_update(revoke_b) == 4
        by_revoked = sign_keylist(b, version=5, authorizations=lab.auths, issued_at=lab.now)
        assert code_of(dev.apply_keylist_update, by_revoked) == ErrorCode.KEY_REVOKED
        # transition-mode signer may not un-revoke
        assert dev.storage.counters().keylist_version == 4
    with device(lab, dev_dir) as dev:  # never empty or unverifiable
        store = dev.storage.load_trust()
        assert store.version == 4 and store.usable(Role.FIRMWARE, None)
        assert dev.boot().version == "1.0.0"


def test_key_expiry_judged_against_latest_known_time(lab: Lab, tmp_path: Path) -> None:
    """A device with no clock (or one reset to 1970) learns time from verified key lists."""
    d = tmp_path / "dev"
    lab.provision(d, V1, cfg=CFG, clock=lambda: None).close()
    b = new_key()
    a_expires = lab.now + 300 * DAY  # Lab.authorize: not_after = now + 300 days
    later = a_expires + 10 * DAY
    b_auth = issue_authorization(
        lab.root,
        b.public_key,
        roles={Role.FIRMWARE, Role.KEYLIST},
        scopes=[Scope(lab.vendor_id)],
        not_before=lab.now,
        not_after=lab.now + 700 * DAY,
    )
    kl = sign_keylist(lab.root, version=2, authorizations=[*lab.auths, b_auth], issued_at=later)
    m_a = lab.release(V2, version="1.1.0", seq=6, counter=2)
    with Device(d, clock=lambda: None, checkpoint=8192) as dev:
        dev.boot()
        dev.apply_keylist_update(kl)
        assert dev.storage.load_trust().latest_time == later
        assert code_of(dev.install, MemoryTransport(m_a, V2)) == ErrorCode.KEY_EXPIRED
    with Device(d, clock=lambda: 0, checkpoint=8192) as dev:  # clock reset: still expired
        dev.boot()
        assert code_of(dev.install, MemoryTransport(m_a, V2)) == ErrorCode.KEY_EXPIRED
        dev.install(
            MemoryTransport(lab.release(V2, version="1.1.0", seq=6, counter=2, signers=[b]), V2)
        )


# --- recovery -----------------------------------------------------------------------------------
def test_straggler_recovers_with_root_signed_list(lab: Lab, dev_dir: Path, tmp_path: Path) -> None:
    """A device that missed the whole rotation: its list holds only A, the fleet moved to B
    and the final list was signed by B (transition mode). It can verify neither the list nor
    B-signed releases; a root-signed list (whole replacement) brings it back."""
    b = new_key()
    lab.keylist_update([b])  # v2: the fleet's list; this device never got it
    final_by_b = rotate_out(lab, b, by=b)  # v3, signed by B
    patch = lab.release(V3, version="1.2.0", seq=7, counter=2, signers=[b])
    with device(lab, dev_dir) as dev:
        dev.boot()
        assert code_of(dev.apply_keylist_update, final_by_b) == ErrorCode.UNTRUSTED_KEY
        assert code_of(dev.install, MemoryTransport(patch, V3)) == ErrorCode.UNTRUSTED_KEY
        recovery = rotate_out(lab, b)  # v4, root-signed, same content
        assert dev.apply_keylist_update(recovery) == 4
        dev.install(MemoryTransport(patch, V3))
        assert dev.boot().mode == "test"
        dev.confirm()
    assert boots(lab, dev_dir) == "1.2.0"


# --- transition mode: a fleet shipped with one key and no root ---------------------------------
@pytest.fixture
def legacy(tmp_path: Path) -> Iterator[tuple[Lab, SoftwareSigner, Path]]:
    """Devices whose OTP anchor is the single operational key K0 (no root)."""
    lab = Lab()
    k0 = lab.op
    lab.bundle = TrustBundle(k0.public_key, single_key_keylist(k0, issued_at=lab.now - DAY))
    d = tmp_path / "legacy"
    lab.provision(d, V1, cfg=CFG, checkpoint=8192).close()
    yield lab, k0, d


def _legacy_auth(k0: SoftwareSigner, lab: Lab, key: SoftwareSigner) -> bytes:
    return issue_authorization(
        k0,
        key.public_key,
        roles={Role.FIRMWARE, Role.KEYLIST},
        scopes=[Scope(lab.vendor_id, frozenset({lab.class_id}))],
        not_before=lab.now - DAY,
        not_after=lab.now + 365 * DAY,
        name="k1",
    )


def test_transition_mode_single_key_fleet_rotates(legacy: tuple[Lab, SoftwareSigner, Path]) -> None:
    lab, k0, d = legacy
    k1 = new_key()
    anchor = frozenset({Role.FIRMWARE, Role.KEYLIST})
    k1_auth = _legacy_auth(k0, lab, k1)
    add = sign_keylist(
        k0, version=2, authorizations=[k1_auth], issued_at=lab.now, anchor_roles=anchor
    )
    retire = sign_keylist(
        k1, version=3, authorizations=[k1_auth], revoked={k0.public_key.key_id},
        issued_at=lab.now + 1, anchor_roles=anchor,
    )  # fmt: skip
    with device(lab, d) as dev:
        dev.boot()
        # K1 cannot sign anything before K0 added it
        m1 = lab.release(V2, version="1.1.0", seq=6, counter=2, signers=[k1])
        assert code_of(dev.install, MemoryTransport(m1, V2)) == ErrorCode.UNTRUSTED_KEY
        assert dev.apply_keylist_update(add) == 2  # signed by the old key: transition mode
        assert dev.apply_keylist_update(retire) == 3  # signed by the new key, K0 revoked
    with device(lab, d) as dev:
        assert dev.boot().version == "1.0.0"  # K0-signed firmware keeps running
        store = dev.storage.load_trust()
        assert [k.key_id for k in store.usable(Role.FIRMWARE, None)] == [k1.public_key.key_id]
        old = lab.release(V2, version="1.1.0", seq=6, counter=2, signers=[k0])
        assert code_of(dev.install, MemoryTransport(old, V2)) == ErrorCode.KEY_REVOKED
        # K0 can no longer sign key lists either (this is what closes the risk window)
        rogue = new_key()
        grab = sign_keylist(
            k0, version=9, authorizations=[_legacy_auth(k0, lab, rogue)], issued_at=lab.now,
            anchor_roles=anchor,
        )  # fmt: skip
        assert code_of(dev.apply_keylist_update, grab) == ErrorCode.KEY_REVOKED
        # K1 may not hand the anchor roles back (only the anchor could, and it is revoked)
        dev.install(MemoryTransport(m1, V2))
        assert dev.boot().mode == "test"
        dev.confirm()
    assert boots(lab, d) == "1.1.0"


def test_transition_mode_risk_old_key_holder_can_rotate_fleet(
    legacy: tuple[Lab, SoftwareSigner, Path],
) -> None:
    """The documented risk: before the old key is retired, whoever holds it (an attacker with
    a stolen copy) can push a list adding their own key — and even drop ours."""
    lab, k0, d = legacy
    attacker = new_key()
    grab = sign_keylist(
        k0, version=2, authorizations=[_legacy_auth(k0, lab, attacker)], issued_at=lab.now,
        anchor_roles={Role.FIRMWARE, Role.KEYLIST},
    )  # fmt: skip
    with device(lab, d) as dev:
        dev.boot()
        assert dev.apply_keylist_update(grab) == 2
        evil = lab.release(V2, version="6.6.6", seq=66, counter=2, signers=[attacker])
        dev.install(MemoryTransport(evil, V2))  # accepted: this is why the window must be short


def test_non_anchor_signer_cannot_grant_anchor_roles(lab: Lab, dev_dir: Path) -> None:
    b = new_key()
    with device(lab, dev_dir) as dev:
        dev.apply_keylist_update(rotate_in(lab, b))
        grant = sign_keylist(
            b, version=3, authorizations=[*lab.auths, lab.authorize(b)], issued_at=lab.now,
            anchor_roles={Role.FIRMWARE},
        )  # fmt: skip
        assert code_of(dev.apply_keylist_update, grant) == ErrorCode.KEY_ROLE


# --- the updater's order: key list first --------------------------------------------------------
class FakeServer(MemoryTransport):
    """A check-in transport in memory: offers ``manifest`` and publishes ``keylist_doc``."""

    def __init__(self, manifest: bytes | None, image: bytes, keylist_doc: bytes | None) -> None:
        super().__init__(manifest or b"", image)
        self.offer = manifest is not None
        self.keylist_doc = keylist_doc
        self.keylist_version = 0
        self.last_checkin: dict[str, Any] | None = None
        self.facts: list[dict[str, Any]] = []

    def checkin(self, facts: dict[str, Any] | None = None) -> dict[str, Any] | None:
        self.facts.append(dict(facts or {}))
        update = {"version": "x"} if self.offer else None
        self.last_checkin = {
            "update": update,
            "keylist_version": self.keylist_version,
            "poll_interval": 1800,
        }
        return update

    def keylist(self, etag: str | None = None) -> tuple[bytes, str] | None:
        assert self.keylist_doc is not None
        return self.keylist_doc, '"v"'


def test_updater_applies_revocation_before_the_offered_update(lab: Lab, dev_dir: Path) -> None:
    from otaguard.clock import SimClock

    b = new_key()
    clock = SimClock(lab.now)
    with device(lab, dev_dir) as dev:
        dev.apply_keylist_update(rotate_in(lab, b))
        revoke = rotate_out(lab, b)
        signed_by_a = lab.release(V2, version="1.1.0", seq=6, counter=2)
        srv = FakeServer(signed_by_a, V2, revoke)
        srv.keylist_version = 3
        up = Updater(dev, srv, clock=clock)
        r = up.poll_once()
        assert (r.keylist_from, r.keylist_version) == (2, 3)
        assert (r.outcome, r.error, r.version) == ("failed", "E_KEY_REVOKED", "1.0.0")
        assert r.next_poll == lab.now + 1800
        assert srv.facts[0]["keylist_version"] == 2
        assert srv.offsets == []  # not one image byte was requested
        # next cycle: reports the new key-list version and the last error
        clock.advance(1800)
        srv.offer = False
        r = up.poll_once()
        assert r.outcome == "idle" and srv.facts[-1]["keylist_version"] == 3
        assert srv.facts[-1]["last_error"] == "E_KEY_REVOKED"
        # a B-signed patch: installed, test-booted, confirmed, reported
        srv.manifest = lab.release(V2, version="1.1.0", seq=6, counter=2, signers=[b])
        srv.offer = True
        r = up.poll_once()
        assert (r.outcome, r.version) == ("confirmed", "1.1.0")
        assert srv.events[-1] == {"event": "confirmed", "version": "1.1.0"}
        assert srv.facts[-1]["slot_state"]["active"] == "A"
        assert up.facts()["slot_state"]["active"] == "B"


def test_updater_reverts_on_failed_self_test_and_reports_bad_keylist(
    lab: Lab, dev_dir: Path
) -> None:
    with device(lab, dev_dir) as dev:
        forged = sign_keylist(new_key(), version=5, authorizations=lab.auths, issued_at=lab.now)
        srv = FakeServer(lab.release(V2, version="1.1.0", seq=6, counter=2), V2, forged)
        srv.keylist_version = 5
        up = Updater(dev, srv, self_test=lambda _b: False)
        r = up.poll_once()
        assert r.keylist_error == "E_UNTRUSTED_KEY" and r.keylist_version == 1
        assert (r.outcome, r.error, r.version) == ("reverted", "E_SELF_TEST", "1.0.0")
        assert {"event": "error", "error": "E_UNTRUSTED_KEY", "detail": "key-list update"} in (
            srv.events
        )
