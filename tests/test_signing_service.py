"""In-process signing service: policy → envelope → self-check → audit → state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from otaguard.crypto.algorithms import HashAlg
from otaguard.crypto.software import SoftwareSigner
from otaguard.errors import AuditError, ErrorCode, OtaError, PolicyError
from otaguard.manifest.ids import class_id, vendor_id
from otaguard.manifest.verify import verify_envelope
from otaguard.signing.audit import AuditLog, read_records, verify_log
from otaguard.signing.policy import Grant, Policy, Requester, Role, SigningRequest
from otaguard.signing.service import SigningService
from otaguard.signing.state import SigningState
from otaguard.trust.model import StaticKeys

NOW = 1_800_000_000
CI = Requester("ci", Role.RELEASE)
SO = Requester("officer", Role.SECURITY_OFFICER)
POLICY = Policy(
    grants={"ci": (Grant("example.com", "thermo"),), "officer": (Grant("example.com"),)}
)


def make_request(**kw: Any) -> SigningRequest:
    base: dict[str, Any] = {
        "image_digest": b"\x42" * 32,
        "digest_alg": HashAlg.SHA256,
        "image_size": 4096,
        "vendor": "example.com",
        "model": "thermo",
        "hw_rev": "A",
        "version": "1.0.0",
        "min_version": None,
        "security_counter": 1,
        "expires": NOW + 86400,
        "uri": "https://u.example.com/fw",
    }
    base.update(kw)
    return SigningRequest(**base)


class Env:
    def __init__(self, tmp: Path, seal_every: int = 4) -> None:
        self.tmp = tmp
        self.signer = SoftwareSigner(ed25519.Ed25519PrivateKey.generate())
        self.seal_every = seal_every
        self.clock = float(NOW)
        self.service = self.open()

    def open(self) -> SigningService:
        log = AuditLog.open(self.tmp / "audit.log", self.signer, seal_every=self.seal_every)
        state = SigningState(self.tmp / "state.sqlite")
        return SigningService(self.signer, POLICY, log, state, clock=lambda: self.clock)

    def reopen(self) -> SigningService:
        self.service.close()
        self.service.state.close()
        self.service = self.open()
        return self.service


@pytest.fixture
def env(tmp_path: Path) -> Env:
    return Env(tmp_path)


def test_sign_release_verifies_and_is_audited(env: Env) -> None:
    signed = env.service.sign_release(make_request(), CI)
    vm = verify_envelope(signed.envelope, StaticKeys([env.signer.public_key]), now=NOW)
    assert vm.info == signed.info
    assert vm.info.vendor_id == vendor_id("example.com")
    assert vm.info.class_id == class_id(vm.info.vendor_id, "thermo", "A")
    assert vm.info.sequence_number >= NOW  # floor = clock, survives a lost state DB
    assert vm.manifest_digest == signed.manifest_digest
    assert signed.key_ids == (env.signer.public_key.key_id.hex(),)
    rec = [r for r in read_records(env.service.audit.path) if r.op == "sign-manifest"]
    assert len(rec) == 1 and rec[0].seq == signed.audit.seq and rec[0].actor == "ci"
    s = rec[0].subject
    assert s["version"] == "1.0.0" and s["sequence"] == signed.sequence
    assert s["image_digest"] == "42" * 32 and s["manifest_digest"] == vm.manifest_digest.hex()
    env.service.close()
    assert verify_log(env.service.audit.path, [env.signer.public_key]).first_unsealed is None


def test_sequence_and_floors_advance(env: Env) -> None:
    a = env.service.sign_release(make_request(version="1.0.0"), CI)
    b = env.service.sign_release(make_request(version="1.1.0", security_counter=2), CI)
    assert b.sequence > a.sequence
    # another model has its own floors but shares the global sequence
    c = env.service.sign_release(make_request(model="gw", version="0.1.0"), SO)
    assert c.sequence > b.sequence
    with pytest.raises(PolicyError) as ei:
        env.service.sign_release(make_request(version="1.2.0", security_counter=1), CI)
    assert ei.value.code == ErrorCode.SECURITY_COUNTER
    with pytest.raises(PolicyError) as ei:
        env.service.sign_release(make_request(version="1.0.5", security_counter=2), CI)
    assert ei.value.code == ErrorCode.DOWNGRADE
    d = env.service.sign_release(
        make_request(version="1.0.5", security_counter=2, downgrade=True), SO
    )
    assert d.sequence > c.sequence
    refusals = [r for r in read_records(env.service.audit.path) if r.op == "sign-refused"]
    assert [r.subject["error"] for r in refusals] == ["E_SECURITY_COUNTER", "E_DOWNGRADE"]


def test_state_survives_restart(env: Env) -> None:
    env.service.sign_release(make_request(version="2.0.0", security_counter=3), CI)
    svc = env.reopen()
    with pytest.raises(PolicyError) as ei:
        svc.sign_release(make_request(version="1.9.0", security_counter=3), CI)
    assert ei.value.code == ErrorCode.DOWNGRADE


def test_lost_state_is_rebuilt_from_audit_log(env: Env) -> None:
    """Crash between audit append and state commit == state without the record: replayed."""
    signed = env.service.sign_release(make_request(version="3.0.0", security_counter=7), CI)
    env.service.close()
    env.service.state.close()
    for p in env.tmp.glob("state.sqlite*"):
        p.unlink()
    svc = env.open()
    env.service = svc
    with pytest.raises(PolicyError) as ei:
        svc.sign_release(make_request(version="3.1.0", security_counter=6), CI)
    assert ei.value.code == ErrorCode.SECURITY_COUNTER
    env.clock = NOW - 1000.0  # even with a clock behind, sequence keeps rising
    nxt = svc.sign_release(make_request(version="3.1.0", security_counter=7), CI)
    assert nxt.sequence > signed.sequence


def test_truncated_log_detected_by_state_anchor(tmp_path: Path) -> None:
    env = Env(tmp_path, seal_every=1)
    for i in range(3):
        env.service.sign_release(make_request(version=f"1.{i}.0"), CI)
    env.service.close()
    env.service.state.close()
    log = tmp_path / "audit.log"
    lines = log.read_bytes().splitlines(keepends=True)
    seals = [i for i, ln in enumerate(lines) if b'"op":"seal"' in ln]
    log.write_bytes(b"".join(lines[: seals[1] + 1]))  # cut back to an earlier, valid seal
    verify_log(log, [env.signer.public_key])  # the log alone looks fine...
    with pytest.raises(AuditError) as ei:
        env.open()  # ...but the service's anchor says there was more
    assert ei.value.code == ErrorCode.AUDIT_SEAL
    assert ei.value.record == seals[1] + 1


def test_tampered_log_stops_the_service(env: Env) -> None:
    env.service.sign_release(make_request(), CI)
    env.service.close()
    env.service.state.close()
    log = env.tmp / "audit.log"
    log.write_bytes(log.read_bytes().replace(b'"version":"1.0.0"', b'"version":"9.0.0"'))
    with pytest.raises(AuditError) as ei:
        env.open()
    assert ei.value.code == ErrorCode.AUDIT_CHAIN


class BrokenSigner:
    """Signs with a different key than it claims: the self-check must catch it."""

    def __init__(self) -> None:
        self._a = SoftwareSigner(ed25519.Ed25519PrivateKey.generate())
        self._b = SoftwareSigner(ed25519.Ed25519PrivateKey.generate())

    @property
    def public_key(self) -> Any:
        return self._a.public_key

    @property
    def alg(self) -> Any:
        return self._a.alg

    def sign(self, data: bytes) -> bytes:
        return self._b.sign(data)


def test_self_check_refuses_bad_signature(tmp_path: Path) -> None:
    signer = BrokenSigner()
    good = SoftwareSigner(ed25519.Ed25519PrivateKey.generate())
    log = AuditLog.open(tmp_path / "a.log", good)
    svc = SigningService(signer, POLICY, log, SigningState(tmp_path / "s.db"), clock=lambda: NOW)
    with pytest.raises(OtaError) as ei:
        svc.sign_release(make_request(), CI)
    assert ei.value.code == ErrorCode.INTERNAL
    assert not [r for r in read_records(tmp_path / "a.log") if r.op == "sign-manifest"]
    # nothing was committed: the same version is still signable afterwards
    svc2 = SigningService(good, POLICY, log, svc.state, clock=lambda: NOW)
    svc2.sign_release(make_request(), CI)


def test_record_event(env: Env) -> None:
    head = env.service.record_event("officer", "revoke", {"kid": "ab" * 16})
    recs = list(read_records(env.service.audit.path))
    assert recs[head.seq].op == "revoke"
    with pytest.raises(AuditError):
        env.service.record_event("officer", "seal", {})
