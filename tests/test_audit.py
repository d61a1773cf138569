"""Audit log: every kind of tampering is detected and names the first bad record."""

from __future__ import annotations

import itertools
import json
import multiprocessing
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otaguard.crypto.algorithms import CoseAlg
from otaguard.crypto.keys import PublicKey
from otaguard.crypto.software import SoftwareSigner
from otaguard.errors import AuditError, ErrorCode
from otaguard.signing.audit import (
    AuditHead,
    AuditLog,
    canonical_json,
    read_records,
    record_hash,
    verify_log,
)


def _signer() -> SoftwareSigner:
    return SoftwareSigner(ed25519.Ed25519PrivateKey.generate())


SEALER = _signer()
KEY = SEALER.public_key


def _make_log(path: Path, n: int = 7, seal_every: int = 3, close: bool = True) -> AuditLog:
    log = AuditLog.open(path, SEALER, seal_every=seal_every)
    for i in range(n):
        log.append("ci", "sign-manifest", {"version": f"1.0.{i}", "model": "thermo", "counter": i})
    if close:
        log.close()
    return log


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _expect(path: Path, code: ErrorCode, record: int, **kw: object) -> AuditError:
    with pytest.raises(AuditError) as ei:
        verify_log(path, [KEY], **kw)  # type: ignore[arg-type]
    assert ei.value.code == code, ei.value
    assert ei.value.record == record, ei.value
    return ei.value


def test_good_log_verifies(tmp_path: Path) -> None:
    p = tmp_path / "audit.log"
    _make_log(p)
    rep = verify_log(p, [KEY])
    recs = list(read_records(p))
    # genesis + 7 records + seals after every 3 + closing seal
    assert rep.records == len(recs)
    assert recs[0].op == "log-open" and recs[-1].op == "seal"
    assert rep.seals == sum(1 for r in recs if r.op == "seal") >= 3
    assert rep.first_unsealed is None and rep.unsealed == 0
    assert rep.seal_key_ids == [KEY.key_id.hex()]
    assert rep.head == AuditHead(len(recs) - 1, recs[-1].hash)
    # records hash-chain: each prev is the hash of the line before
    raw = [ln.rstrip(b"\n") for ln in _lines(p)]
    for i in range(1, len(raw)):
        assert recs[i].prev == record_hash(raw[i - 1])


def _rewrite(path: Path, index: int, mutate: object) -> None:
    lines = _lines(path)
    obj = json.loads(lines[index])
    mutate(obj)  # type: ignore[operator]
    lines[index] = canonical_json(obj) + b"\n"
    path.write_bytes(b"".join(lines))


def _first_plain_record(path: Path) -> int:
    return next(r.seq for r in read_records(path) if r.op == "sign-manifest")


def test_edited_record_names_that_record(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    _make_log(p)
    idx = _first_plain_record(p) + 1
    _rewrite(p, idx, lambda o: o["subject"].__setitem__("version", "9.9.9"))
    err = _expect(p, ErrorCode.AUDIT_CHAIN, idx)
    assert f"record {idx}" in err.detail


def test_edited_record_before_seal_names_that_record(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    _make_log(p)
    recs = list(read_records(p))
    idx = next(r.seq for r in recs if r.op == "seal") - 1
    _rewrite(p, idx, lambda o: o.__setitem__("actor", "mallory"))
    _expect(p, ErrorCode.AUDIT_CHAIN, idx)


def test_non_canonical_edit_is_detected(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    _make_log(p)
    lines = _lines(p)
    lines[2] = lines[2].replace(b'"actor":', b'"actor": ')
    p.write_bytes(b"".join(lines))
    _expect(p, ErrorCode.AUDIT_CHAIN, 2)


def test_deleted_record(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    _make_log(p)
    lines = _lines(p)
    del lines[2]
    p.write_bytes(b"".join(lines))
    err = _expect(p, ErrorCode.AUDIT_CHAIN, 2)
    assert "deleted" in err.detail


def test_deleted_and_renumbered_record_caught_by_seal(tmp_path: Path) -> None:
    """A forger who relinks and renumbers the chain after a deletion still breaks the seal."""
    p = tmp_path / "a.log"
    _make_log(p, n=2, seal_every=100)  # genesis, r1, r2, seal(3)
    lines = [ln.rstrip(b"\n") for ln in _lines(p)]
    del lines[1]
    out: list[bytes] = []
    prev = "0" * 64
    for i, ln in enumerate(lines):
        obj = json.loads(ln)
        obj["seq"], obj["prev"] = i, prev
        if obj["op"] == "seal":
            obj["subject"]["last"] = i - 1
        line = canonical_json(obj)
        prev = record_hash(line)
        out.append(line + b"\n")
    p.write_bytes(b"".join(out))
    _expect(p, ErrorCode.AUDIT_SEAL, 2)


def test_reordered_records(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    _make_log(p)
    lines = _lines(p)
    lines[2], lines[3] = lines[3], lines[2]
    p.write_bytes(b"".join(lines))
    err = _expect(p, ErrorCode.AUDIT_CHAIN, 2)
    assert "deleted" in err.detail or "reordered" in err.detail


def test_truncated_tail_after_seal(tmp_path: Path) -> None:
    """Cutting records off the end leaves a log that does not end with a seal."""
    p = tmp_path / "a.log"
    _make_log(p)
    lines = _lines(p)
    cut = len(lines) - 2  # drop the closing seal and the record before it
    p.write_bytes(b"".join(lines[:cut]))
    last_seal = max(i for i, ln in enumerate(lines[:cut]) if b'"op":"seal"' in ln)
    err = _expect(p, ErrorCode.AUDIT_SEAL, last_seal + 1)
    assert "not covered by a seal" in err.detail
    rep = verify_log(p, [KEY], allow_unsealed_tail=True)
    assert rep.first_unsealed == last_seal + 1 and rep.warnings


def test_truncated_back_to_earlier_seal_needs_anchor(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    _make_log(p)
    full = verify_log(p, [KEY])
    assert full.head is not None
    lines = _lines(p)
    seals = [i for i, ln in enumerate(lines) if b'"op":"seal"' in ln]
    p.write_bytes(b"".join(lines[: seals[0] + 1]))
    # Without an anchor, a log cut exactly after an earlier seal is indistinguishable.
    verify_log(p, [KEY])
    _expect(p, ErrorCode.AUDIT_SEAL, seals[0] + 1, expect_head=full.head)


def test_anchor_hash_mismatch(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    _make_log(p)
    rep = verify_log(p, [KEY])
    assert rep.head is not None
    bogus = AuditHead(3, "ab" * 32)
    _expect(p, ErrorCode.AUDIT_CHAIN, 3, expect_head=bogus)
    assert verify_log(p, [KEY], expect_head=rep.head).records == rep.records


def test_forged_seal_wrong_key(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    mallory = _signer()
    log = AuditLog.open(p, mallory, seal_every=2)
    log.append("ci", "sign-manifest", {"v": 1})
    log.close()
    _expect(p, ErrorCode.AUDIT_SEAL, 2)
    assert verify_log(p, [mallory.public_key]).seals == 1


def test_forged_seal_bad_signature(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    _make_log(p)
    recs = list(read_records(p))
    idx = next(r.seq for r in recs if r.op == "seal")
    lines = _lines(p)
    obj = json.loads(lines[idx])
    sig = bytearray(bytes.fromhex(obj["sig"]))
    sig[-5] ^= 0x01
    obj["sig"] = sig.hex()
    lines[idx] = canonical_json(obj) + b"\n"
    p.write_bytes(b"".join(lines))
    err = _expect(p, ErrorCode.AUDIT_SEAL, idx)
    assert "forged" in err.detail


def test_seal_over_edited_last_line_fails(tmp_path: Path) -> None:
    """Editing the final seal's own fields breaks its signature."""
    p = tmp_path / "a.log"
    _make_log(p)
    lines = _lines(p)
    obj = json.loads(lines[-1])
    obj["time"] += 1
    lines[-1] = canonical_json(obj) + b"\n"
    p.write_bytes(b"".join(lines))
    _expect(p, ErrorCode.AUDIT_SEAL, len(lines) - 1)


def test_torn_last_line_detected_and_recovered(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    _make_log(p)
    n = len(_lines(p))
    torn = b'{"actor":"ci","op":"sign-man'  # crash mid-append
    with p.open("ab") as f:
        f.write(torn)
    _expect(p, ErrorCode.AUDIT_CHAIN, n)
    with pytest.raises(AuditError) as ei:
        AuditLog.open(p, SEALER)
    assert ei.value.code == ErrorCode.AUDIT_CHAIN
    log = AuditLog.open(p, SEALER, recover=True)
    log.close()
    recs = list(read_records(p))
    assert recs[n].op == "recover-torn-tail"
    assert recs[n].subject["discarded_bytes"] == len(torn)
    verify_log(p, [KEY])


def test_empty_log_is_an_error(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    p.write_bytes(b"")
    _expect(p, ErrorCode.AUDIT_SEAL, 0)


def test_reopen_continues_chain_and_rejects_tampered(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    _make_log(p, n=2)
    log = AuditLog.open(p, SEALER, seal_every=100)
    log.append("ci", "revoke", {"kid": "00" * 16})
    log.close()
    assert verify_log(p, [KEY]).records == len(_lines(p))
    _rewrite(p, 1, lambda o: o.__setitem__("actor", "x"))
    with pytest.raises(AuditError):
        AuditLog.open(p, SEALER)


def test_p256_sealer(tmp_path: Path) -> None:
    signer = SoftwareSigner(ec.generate_private_key(ec.SECP256R1()))
    p = tmp_path / "a.log"
    log = AuditLog.open(p, signer, seal_every=1)
    log.append("ci", "authorize-key", {"kid": "ab" * 16})
    log.close()
    assert verify_log(p, [signer.public_key]).seals == 1  # genesis + record, one seal


def pycose_verify(sign1_bytes: bytes, payload: bytes, key: PublicKey) -> bool:
    """Independent check with pycose (its decode() trips over cbor2's tuple tag values)."""
    import cbor2
    from pycose.keys import CoseKey
    from pycose.messages import Sign1Message

    tag = cbor2.loads(sign1_bytes)
    assert tag.tag == 18
    prot, unprot, body, sig = tag.value
    msg = Sign1Message.from_cose_obj([prot, dict(unprot), body, sig], True)
    msg.payload = payload
    msg.key = CoseKey.from_dict(key.to_cose_key())
    return bool(msg.verify_signature())


def test_seal_verifies_with_pycose(tmp_path: Path) -> None:
    from otaguard.signing.audit import _seal_payload

    # pycose knows the polymorphic EdDSA (-8) and ES256 (-7), not the fully-specified ids.
    for signer in (
        SoftwareSigner(ed25519.Ed25519PrivateKey.generate(), CoseAlg.EDDSA),
        SoftwareSigner(ec.generate_private_key(ec.SECP256R1()), CoseAlg.ES256),
    ):
        p = tmp_path / f"{signer.alg.name}.log"
        AuditLog.open(p, signer).close()
        seal = list(read_records(p))[-1]
        assert seal.sig is not None
        assert verify_log(p, [signer.public_key]).seals == 1
        assert pycose_verify(seal.sig, _seal_payload(seal), signer.public_key)
        assert not pycose_verify(seal.sig, _seal_payload(seal) + b" ", signer.public_key)


def _appender(path: str, n: int, who: str) -> None:
    log = AuditLog.open(path, None, trusted=[KEY])
    for i in range(n):
        log.append(who, "sign-manifest", {"i": i})
    log.close()


def test_concurrent_processes_do_not_interleave(tmp_path: Path) -> None:
    p = tmp_path / "a.log"
    AuditLog.open(p, SEALER).close()
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_appender, args=(str(p), 25, f"w{k}")) for k in range(3)]
    for pr in procs:
        pr.start()
    for pr in procs:
        pr.join(30)
        assert pr.exitcode == 0
    log = AuditLog.open(p, SEALER)
    log.close()
    rep = verify_log(p, [KEY])
    assert rep.records == 1 + 1 + 75 + 1  # genesis, seal, 75 appends, closing seal


@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(data=st.data())
def test_any_single_byte_edit_is_detected(
    tmp_path_factory: pytest.TempPathFactory, data: st.DataObject
) -> None:
    base = _sealed_log(tmp_path_factory)
    original = base.read_bytes()
    pos = data.draw(st.integers(0, len(original) - 1), label="pos")
    new = data.draw(st.integers(0, 255).filter(lambda b: b != original[pos]), label="byte")
    mutated = bytearray(original)
    mutated[pos] = new
    p = base.parent / "mutated.log"
    p.write_bytes(bytes(mutated))
    with pytest.raises(AuditError) as ei:
        verify_log(p, [KEY])
    assert ei.value.code in (ErrorCode.AUDIT_CHAIN, ErrorCode.AUDIT_SEAL)
    assert ei.value.record is not None


_SEALED: dict[str, Path] = {}


def _sealed_log(factory: pytest.TempPathFactory) -> Path:
    if "p" not in _SEALED:
        p = factory.mktemp("sealed") / "audit.log"
        _make_log(p, n=5, seal_every=2)
        _SEALED["p"] = p
    return _SEALED["p"]


@settings(max_examples=60, deadline=None)
@given(cut=st.integers(min_value=1, max_value=10_000))
def test_any_truncation_is_detected_with_anchor(
    cut: int, tmp_path_factory: pytest.TempPathFactory
) -> None:
    base = _sealed_log(tmp_path_factory)
    original = base.read_bytes()
    rep = verify_log(base, [KEY])
    cut = cut % len(original) or 1
    p = base.parent / "cut.log"
    p.write_bytes(original[: len(original) - cut])
    with pytest.raises(AuditError):
        verify_log(p, [KEY], expect_head=rep.head)


def test_rotation_links_files(tmp_path: Path) -> None:
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    log = _make_log(first, n=2, close=False)
    nxt = log.rotate(second)
    nxt.append("ci", "sign-manifest", {"version": "2.0.0"})
    nxt.close()
    rep1 = verify_log(first, [KEY])  # the old file was sealed on rotation
    rep2 = verify_log(second, [KEY])
    assert rep2.continues == {"log_id": rep1.log_id, "head": str(rep1.head)}
    with pytest.raises(AuditError) as ei:
        log.append("ci", "x", {})  # the rotated-out file is closed
    assert ei.value.code == ErrorCode.STATE
    with pytest.raises(AuditError) as ei:
        AuditLog.open(second, SEALER).rotate(first)
    assert ei.value.code == ErrorCode.EXISTS


def test_show_escapes_control_characters_from_requesters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Regression: `audit show` printed control characters from requester-supplied fields, so
    a refused request could be made to look like a successful signature on a terminal."""
    import unicodedata

    from otaguard.cli.main import main

    path = tmp_path / "audit.log"
    log = AuditLog.open(path, SEALER, seal_every=100)
    fake = "\x1b[1A\x1b[2K\r     2  2026-01-01  ci  sign-manifest  acme gw/r1 9.9.9\u202e\u2028"
    log.append(fake, "sign-refused", {"error": "E_POLICY", "model": fake, "version": "\x07"})
    log.close()
    assert main(["audit", "show", str(path), "--op", "sign-refused"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # one record, one line
    bad = [c for c in out[:-1] if unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp")]
    assert bad == [], bad
    assert "\\x1b[1A" in out and "\\u202e" in out and "\\x07" in out


@given(st.text())
def test_terminal_safe_leaves_no_control_character(text: str) -> None:
    import unicodedata

    from otaguard.cli.audit import terminal_safe

    controls = ("Cc", "Cf", "Zl", "Zp")
    shown = terminal_safe(text)
    assert not [c for c in shown if unicodedata.category(c) in controls]
    if "\\" not in text and not any(unicodedata.category(c) in controls for c in text):
        assert shown == text  # ordinary text is shown as it is
    else:
        assert shown != text


def test_chain_is_plain_sha256_of_the_previous_line_as_documented(tmp_path: Path) -> None:
    """docs/signing.md: ``prev`` is the SHA-256 of the previous line's bytes (without the
    newline), 64 zeros for record 0. Checked on the stored file with hashlib alone, so a change
    to how the code hashes a record (which its own verifier would follow) cannot pass
    unnoticed."""
    import hashlib
    import json

    path = tmp_path / "audit.log"
    _make_log(path, n=7, seal_every=3)
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    lines = lines[:-1]
    assert len(lines) > 7
    assert json.loads(lines[0])["prev"] == "0" * 64
    for before, line in itertools.pairwise(lines):
        rec = json.loads(line)
        assert rec["prev"] == hashlib.sha256(before).hexdigest(), rec["seq"]
        assert rec["seq"] == json.loads(before)["seq"] + 1
