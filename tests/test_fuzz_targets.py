"""The atheris fuzz targets (``fuzz/``, run at scale by ``make fuzz``) stay runnable and sharp.

- every committed corpus input goes through its target without a crash or oracle violation;
- a short real libFuzzer run of every target passes through ``fuzz/run.py``;
- each target's oracle catches a parser that accepts what it must not (the parser is replaced
  by one that accepts anything, and the target must raise ``OracleViolation``).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fuzz import targets as T

from otaguard.manifest.verify import VerifiedManifest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(T.TARGETS))
def test_committed_corpus_passes(name: str) -> None:
    files = sorted((ROOT / "fuzz" / "corpus" / name).glob("*"))
    assert len(files) >= 10, f"fuzz/corpus/{name} is missing or nearly empty"
    for f in files:
        T.TARGETS[name].run(f.read_bytes())


def test_a_short_libfuzzer_run_of_every_target() -> None:
    proc = subprocess.run(
        [sys.executable, str(ROOT / "fuzz" / "run.py"), "--runs", "3000"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = {ln.split()[0]: ln for ln in proc.stdout.splitlines() if ln.strip()}
    for name in T.TARGETS:
        assert "3,000" in lines[name] and "0 crashes, 0 hangs" in lines[name], proc.stdout


def _accept_anything(data: bytes, *a: Any, **kw: Any) -> VerifiedManifest:
    return VerifiedManifest(T._infos()[0], data, hashlib.sha256(data).digest(), ())


def test_manifest_oracle_catches_a_verifier_that_accepts_garbage(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seed = T._manifest_seeds()[0]
    T._manifest(seed)  # the real verifier: fine
    monkeypatch.setattr(T, "verify_envelope", _accept_anything)
    monkeypatch.setattr(T, "verify_strict", _accept_anything)
    with pytest.raises(T.OracleViolation):
        T._manifest(seed[:-1] + bytes([seed[-1] ^ 1]))


def test_keylist_oracle_catches_a_parser_that_skips_the_signature(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    forged = T.sign_keylist(
        T.fuzz_signer("someone-else"), version=9, authorizations=[], issued_at=T.NOW
    )
    T._keylist(forged)  # the real parser refuses it: fine
    monkeypatch.setattr(T, "parse_keylist", lambda *a, **kw: None)
    with pytest.raises(T.OracleViolation):
        T._keylist(forged)


def test_delta_oracle_catches_an_applier_with_wrong_output(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seed = T._delta_seeds()[0]
    T._delta(seed)
    monkeypatch.setattr(T, "apply_patch_bytes", lambda old, patch, **kw: b"wrong")
    with pytest.raises(T.OracleViolation):
        T._delta(seed)


def test_cbor_oracle_catches_routes_that_disagree(monkeypatch: pytest.MonkeyPatch) -> None:
    seed = T.cbor.dumps({1: [2, 3]})
    T._cbor(seed)
    monkeypatch.setattr(T.cbor, "loads", lambda data, *a: {1: [2, 4]})
    with pytest.raises(T.OracleViolation):
        T._cbor(seed)
