"""``otaguard release create`` / ``audit`` / ``signing`` end to end through the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from otaguard.cli.main import main
from otaguard.crypto.keys import PublicKey
from otaguard.crypto.software import SoftwareSigner
from otaguard.errors import ErrorCode, OtaError
from otaguard.manifest.verify import verify_envelope
from otaguard.signing.release import parse_expires
from otaguard.trust.model import StaticKeys

from .test_audit import pycose_verify
from .test_signing_http import Service, run_server

PASS = "correct horse battery"


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture
def keyfile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    monkeypatch.setenv("OTAGUARD_KEY_PASSPHRASE", PASS)
    key, pub = tmp_path / "release.key", tmp_path / "release.pub.pem"
    pk = SoftwareSigner.generate(key, "ed25519", PASS.encode())
    pub.write_bytes(pk.to_pem())
    return key, pub


@dataclass
class SealKit:
    """An audit-sealing key of its own, authorized by a root for the audit role only."""

    key: Path
    pub: Path
    root: Path
    root_pub: Path
    authorization: Path

    @property
    def args(self) -> list[str | Path]:  # for release create
        return ["--audit-seal-key-file", self.key]

    @property
    def verify(self) -> list[str | Path]:  # for audit verify
        return ["--seal-authorization", self.authorization, "--root-public", self.root_pub]


@pytest.fixture
def seal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> SealKit:
    monkeypatch.setenv("OTAGUARD_KEY_PASSPHRASE", PASS)
    kit = SealKit(
        tmp_path / "audit.key", tmp_path / "audit.pub.pem", tmp_path / "root.key",
        tmp_path / "root.pub.pem", tmp_path / "audit-key.auth",
    )  # fmt: skip
    for key, pub in ((kit.key, kit.pub), (kit.root, kit.root_pub)):
        pub.write_bytes(SoftwareSigner.generate(key, "ed25519", PASS.encode()).to_pem())
    rc, _, err = run(
        capsys, "keys", "authorize-audit", "--key-file", kit.root, "--public-key", kit.pub,
        "--vendor", "example.com", "--out", kit.authorization,
    )  # fmt: skip
    assert rc == 0, err
    return kit


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "fw.bin"
    p.write_bytes(os.urandom(20_000))
    return p


def release_args(image: Path, out: Path, **kw: Any) -> list[str | Path]:
    opts = {
        "vendor": "example.com",
        "model": "thermo",
        "hw-rev": "B",
        "version": "1.4.0",
        "min-version": "1.0.0",
        "security-counter": "3",
        "expires": "+30d",
        "uri": "https://updates.example.com/thermo-1.4.0.bin",
    }
    opts.update({k.replace("_", "-"): v for k, v in kw.items()})
    args: list[str | Path] = ["release", "create", "--image", image, "--out", out]
    for k, v in opts.items():
        if v is not None:
            args += [f"--{k}", v]
    return args


def pycose_check_envelope(envelope: bytes, key: PublicKey) -> None:
    """Pull the COSE_Sign1 out of the SUIT envelope by hand and verify it with pycose."""
    env = cbor2.loads(envelope)
    assert env.tag == 107
    auth = cbor2.loads(env.value[2])
    digest, *blocks = auth
    assert len(blocks) == 1
    assert pycose_verify(blocks[0], digest, key)


def check_release(out: Path, pub: Path, image: Path) -> dict[str, Any]:
    assert sorted(p.name for p in out.iterdir()) == ["image.bin", "manifest.suit", "release.json"]
    assert (out / "image.bin").read_bytes() == image.read_bytes()
    summary = json.loads((out / "release.json").read_text())
    key = PublicKey.from_pem(pub.read_bytes())
    vm = verify_envelope((out / "manifest.suit").read_bytes(), StaticKeys([key]))
    assert vm.info.version == summary["version"] == "1.4.0"
    assert vm.info.image_size == summary["image"]["size"] == 20_000
    assert vm.info.image_digest.hex() == summary["image"]["digest"]
    assert vm.info.security_counter == summary["security_counter"] == 3
    assert vm.info.sequence_number == summary["sequence"]
    assert str(vm.info.class_id) == summary["class_id"]
    assert vm.manifest_digest.hex() == summary["manifest"]["suit_digest"]
    assert summary["signer_key_ids"] == [key.key_id.hex()]
    assert vm.info.expires is not None and vm.info.expires > time.time() + 29 * 86400
    assert not list(out.parent.glob(f".{out.name}.tmp-*"))
    return summary


def test_release_with_software_key(
    tmp_path: Path,
    keyfile: tuple[Path, Path],
    seal: SealKit,
    image: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key, pub = keyfile
    out, log = tmp_path / "rel", tmp_path / "audit.log"
    state = f"{log}.state.sqlite"
    rc, stdout, _ = run(
        capsys, *release_args(image, out), "--key-file", key, "--alg", "eddsa",
        "--audit-log", log, *seal.args, "--json",
    )  # fmt: skip
    assert rc == 0
    summary = check_release(out, pub, image)
    assert json.loads(stdout) == summary
    pycose_check_envelope(
        (out / "manifest.suit").read_bytes(), PublicKey.from_pem(pub.read_bytes())
    )
    # the manifest CLI agrees
    rc, stdout, _ = run(capsys, "manifest", "verify", out / "manifest.suit", "--key", pub, "--json")
    assert rc == 0 and json.loads(stdout)["valid"] is True
    # the audit log verifies against its anchor, ends with a seal by the audit key, and holds
    # the signature record
    rc, stdout, _ = run(capsys, "audit", "verify", log, *seal.verify, "--state", state, "--json")
    rep = json.loads(stdout)
    assert rc == 0 and rep["valid"] and rep["unsealed"] == 0 and rep["anchored"] is True
    assert rep["seal_key_ids"] == [PublicKey.from_pem(seal.pub.read_bytes()).key_id.hex()]
    rc, stdout, _ = run(capsys, "audit", "verify", log, *seal.verify, "--state", state)
    assert rc == 0 and stdout.startswith("OK (anchored at ")
    # without an anchor it is not OK; --unanchored says what it could not check
    rc, _, err = run(capsys, "audit", "verify", log, *seal.verify)
    assert rc == 1 and "E_AUDIT_ANCHOR" in err
    rc, stdout, err = run(capsys, "audit", "verify", log, *seal.verify, "--unanchored")
    assert rc == 0 and stdout.startswith("OK (UNANCHORED)") and "truncation" in err
    # the release key does not seal: its public key does not verify the seals
    rc, _, err = run(capsys, "audit", "verify", log, "--key", pub, "--state", state)
    assert rc == 1 and "E_AUDIT_SEAL" in err and "untrusted key" in err
    rc, stdout, _ = run(capsys, "audit", "show", log, "--json", "--op", "sign-manifest")
    recs = json.loads(stdout)["records"]
    assert rc == 0 and len(recs) == 1 and recs[0]["seq"] == summary["audit"]["seq"]
    assert recs[0]["subject"]["image_digest"] == summary["image"]["digest"]
    rc, stdout, _ = run(capsys, "audit", "show", log)
    assert rc == 0 and "sign-manifest" in stdout and "seal" in stdout

    # the same version again is refused; nothing is left behind
    out2 = tmp_path / "rel2"
    rc, _, err = run(
        capsys, *release_args(image, out2), "--key-file", key, "--audit-log", log, *seal.args
    )
    assert rc == 1 and "E_DOWNGRADE" in err
    assert not out2.exists() and not list(tmp_path.glob(".rel2.tmp-*"))
    # an existing release directory is never overwritten
    rc, _, err = run(
        capsys, *release_args(image, out, version="1.5.0"), "--key-file", key,
        "--audit-log", log, *seal.args,
    )  # fmt: skip
    assert rc == 1 and "E_EXISTS" in err

    # tamper with the signature record: audit verify names it
    lines = log.read_bytes().splitlines(keepends=True)
    idx = summary["audit"]["seq"]
    lines[idx] = lines[idx].replace(b'"version":"1.4.0"', b'"version":"1.4.1"')
    log.write_bytes(b"".join(lines))
    rc, stdout, _ = run(capsys, "audit", "verify", log, *seal.verify, "--state", state, "--json")
    bad = json.loads(stdout)
    assert rc == 1 and bad == {
        "valid": False,
        "error": "E_AUDIT_CHAIN",
        "record": idx,
        "detail": bad["detail"],
    }
    rc, _, err = run(capsys, "audit", "verify", log, *seal.verify, "--unanchored")
    assert rc == 1 and "E_AUDIT_CHAIN" in err and f"record {idx}" in err
    # and the next local signing refuses to chain onto a tampered log
    rc, _, err = run(
        capsys, *release_args(image, tmp_path / "rel3", version="2.0.0"), "--key-file", key,
        "--audit-log", log, *seal.args,
    )  # fmt: skip
    assert rc == 1 and "E_AUDIT_CHAIN" in err


def test_the_release_key_never_seals(
    tmp_path: Path,
    keyfile: tuple[Path, Path],
    seal: SealKit,
    image: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Regression (hardening issue): seals used to be made by the firmware signing key."""
    key, pub = keyfile
    log = tmp_path / "audit.log"
    # the release key named as the sealing key: refused before anything is signed or written
    rc, _, err = run(
        capsys, *release_args(image, tmp_path / "r"), "--key-file", key, "--audit-log", log,
        "--audit-seal-key-file", key,
    )  # fmt: skip
    assert rc == 1 and "E_CONFIG" in err
    assert not (tmp_path / "r").exists() and not log.exists()
    # no sealing key: the records are chained but unsealed (never sealed by the release key)
    rc, _, err = run(
        capsys, *release_args(image, tmp_path / "r"), "--key-file", key, "--audit-log", log
    )
    assert rc == 0 and "not sealed" in err
    rc, stdout, _ = run(
        capsys, "audit", "verify", log, "--key", pub, "--unanchored", "--allow-unsealed-tail",
        "--json",
    )  # fmt: skip
    rep = json.loads(stdout)
    assert rc == 0 and rep["seals"] == 0 and rep["seal_key_ids"] == []
    # an authorization for a firmware key is not an audit-key authorization
    fw_auth = tmp_path / "fw.auth"
    rc, _, _ = run(
        capsys, "keys", "authorize", "--key-file", seal.root, "--public-key", pub,
        "--vendor", "example.com", "--keylist", tmp_path / "kl.cose", "--out", fw_auth,
    )  # fmt: skip
    assert rc == 0
    rc, _, err = run(
        capsys, "audit", "verify", log, "--seal-authorization", fw_auth,
        "--root-public", seal.root_pub, "--unanchored",
    )  # fmt: skip
    assert rc == 1 and "E_KEY_ROLE" in err
    # and an audit authorization checked against another root is refused
    rc, _, err = run(
        capsys, "audit", "verify", log, "--seal-authorization", seal.authorization,
        "--root-public", pub, "--unanchored",
    )  # fmt: skip
    assert rc == 1 and "E_UNTRUSTED_KEY" in err
    # keys authorize refuses to put an audit key into the device key list
    rc, _, err = run(
        capsys, "keys", "authorize", "--key-file", seal.root, "--public-key", seal.pub,
        "--vendor", "example.com", "--keylist", tmp_path / "kl.cose", "--roles", "audit",
    )  # fmt: skip
    assert rc == 2 and "authorize-audit" in err


def test_seal_outside_the_audit_keys_validity_is_refused(
    tmp_path: Path,
    keyfile: tuple[Path, Path],
    seal: SealKit,
    image: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key, _ = keyfile
    log = tmp_path / "audit.log"
    rc, _, _ = run(
        capsys, *release_args(image, tmp_path / "r"), "--key-file", key, "--audit-log", log,
        *seal.args,
    )  # fmt: skip
    assert rc == 0
    late = tmp_path / "late.auth"  # the same key, authorized only from 2100 on
    rc, _, _ = run(
        capsys, "keys", "authorize-audit", "--key-file", seal.root, "--public-key", seal.pub,
        "--vendor", "example.com", "--not-before", "2100-01-01T00:00:00Z", "--out", late,
    )  # fmt: skip
    assert rc == 0
    rc, _, err = run(
        capsys, "audit", "verify", log, "--seal-authorization", late,
        "--root-public", seal.root_pub, "--unanchored",
    )  # fmt: skip
    assert rc == 1 and "E_KEY_EXPIRED" in err


def test_audit_verify_truncated_and_unsealed(
    tmp_path: Path,
    keyfile: tuple[Path, Path],
    seal: SealKit,
    image: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    key, _ = keyfile
    log = tmp_path / "audit.log"
    rc, _, _ = run(
        capsys, *release_args(image, tmp_path / "r"), "--key-file", key, "--audit-log", log,
        *seal.args,
    )  # fmt: skip
    assert rc == 0
    lines = log.read_bytes().splitlines(keepends=True)
    log.write_bytes(b"".join(lines[:-1]))  # drop the closing seal
    rc, stdout, _ = run(capsys, "audit", "verify", log, *seal.verify, "--unanchored", "--json")
    rep = json.loads(stdout)
    assert rc == 1 and rep["error"] == "E_AUDIT_SEAL" and rep["record"] == 0
    rc, stdout, err = run(
        capsys, "audit", "verify", log, *seal.verify, "--unanchored", "--allow-unsealed-tail"
    )
    assert rc == 0 and "E_AUDIT_SEAL" in err
    # the state DB's anchor says the seal existed: truncation is an error even when allowed
    rc, stdout, _ = run(
        capsys, "audit", "verify", log, *seal.verify, "--allow-unsealed-tail", "--json",
        "--state", f"{log}.state.sqlite",
    )  # fmt: skip
    assert rc == 1 and json.loads(stdout)["error"] == "E_AUDIT_SEAL"


def test_release_usage_errors(
    tmp_path: Path, keyfile: tuple[Path, Path], image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    key, _ = keyfile
    rc, _, err = run(capsys, *release_args(image, tmp_path / "r"), "--key-file", key)
    assert rc == 2 and "--audit-log" in err
    rc, _, err = run(
        capsys, *release_args(image, tmp_path / "r", expires="someday"), "--key-file", key,
        "--audit-log", tmp_path / "a.log",
    )  # fmt: skip
    assert rc == 2 and "E_USAGE" in err
    rc, _, err = run(
        capsys, *release_args(image, tmp_path / "r"), "--signing-url", "http://127.0.0.1:1",
        "--key-file", key,
    )  # fmt: skip
    assert rc == 2
    rc, _, err = run(
        capsys, *release_args(image, tmp_path / "r", version="1.x"), "--key-file", key,
        "--audit-log", tmp_path / "a.log",
    )  # fmt: skip
    assert rc == 1 and "E_MALFORMED" in err
    assert not (tmp_path / "r").exists()


def test_release_with_softhsm_key(
    tmp_path: Path,
    softhsm_token: Any,
    image: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from otaguard.crypto.pkcs11 import generate_keypair

    t = softhsm_token
    pk = generate_keypair(t.label, "release-2026", "p256", pin=t.pin, module=t.module)
    pub = tmp_path / "hsm.pub.pem"
    pub.write_bytes(pk.to_pem())
    monkeypatch.setenv("OTAGUARD_PKCS11_PIN", t.pin)
    audit_pub = tmp_path / "audit.pub.pem"
    audit_pub.write_bytes(
        generate_keypair(t.label, "audit-2026", "ed25519", pin=t.pin, module=t.module).to_pem()
    )
    out, log = tmp_path / "rel", tmp_path / "audit.log"
    rc, _, err = run(
        capsys, *release_args(image, out), "--pkcs11-uri", t.uri("release-2026"),
        "--pkcs11-module", t.module, "--alg", "es256", "--audit-log", log,
        "--audit-seal-pkcs11-uri", t.uri("audit-2026"),
    )  # fmt: skip
    assert rc == 0, err
    check_release(out, pub, image)
    pycose_check_envelope((out / "manifest.suit").read_bytes(), pk)
    rc, stdout, _ = run(capsys, "manifest", "verify", out / "manifest.suit", "--key", pub, "--json")
    assert rc == 0 and json.loads(stdout)["valid"] is True
    rc, _, err = run(
        capsys, "audit", "verify", log, "--key", audit_pub, "--state", f"{log}.state.sqlite"
    )
    assert rc == 0, err  # the HSM's audit key sealed the audit log


def test_release_via_signing_service(
    tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    s = Service(tmp_path / "svc")
    pub = tmp_path / "svc.pub.pem"
    pub.write_bytes(s.signer.public_key.to_pem())
    other = tmp_path / "other.pub.pem"
    other.write_bytes(SoftwareSigner(ed25519.Ed25519PrivateKey.generate()).public_key.to_pem())
    args = release_args(image, tmp_path / "rel", hw_rev="A")
    with run_server(s.app) as url:
        monkeypatch.delenv("OTAGUARD_SIGNING_TOKEN", raising=False)
        rc, _, err = run(capsys, *args, "--signing-url", url)
        assert rc == 1 and "E_AUTH" in err
        monkeypatch.setenv("OTAGUARD_SIGNING_TOKEN", s.tokens["viewer"])
        rc, _, err = run(capsys, *args, "--signing-url", url)
        assert rc == 1 and "E_FORBIDDEN" in err
        monkeypatch.setenv("OTAGUARD_SIGNING_TOKEN", s.tokens["ci"])
        # pinned to the wrong key: the signed result is refused, nothing written
        rc, _, err = run(capsys, *args, "--signing-url", url, "--trust-key", other)
        assert rc == 1 and "E_UNTRUSTED_KEY" in err
        assert not (tmp_path / "rel").exists()
        rc, stdout, err = run(
            capsys, *release_args(image, tmp_path / "rel", hw_rev="A", version="1.5.0"),
            "--signing-url", url, "--trust-key", pub, "--json",
        )  # fmt: skip
        assert rc == 0, err
    summary = json.loads(stdout)
    assert summary["signed_by"] == f"service {url}" and summary["version"] == "1.5.0"
    vm = verify_envelope(
        (tmp_path / "rel" / "manifest.suit").read_bytes(), StaticKeys([s.signer.public_key])
    )
    assert vm.info.sequence_number == summary["sequence"]
    s.service.close()
    seal_pub = tmp_path / "seal.pub.pem"
    seal_pub.write_bytes(s.sealer.public_key.to_pem())
    rc, _, err = run(
        capsys, "audit", "verify", s.log_path, "--key", seal_pub, "--state", s.state_path
    )
    assert rc == 0, err


def test_signing_serve_subprocess(
    tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`otaguard signing token` + `signing serve --port 0` as a real process, then CI use."""
    env = {**os.environ, "OTAGUARD_KEY_PASSPHRASE": PASS}
    key = tmp_path / "svc.key"
    pk = SoftwareSigner.generate(key, "ed25519", PASS.encode())
    pub = tmp_path / "svc.pub.pem"
    pub.write_bytes(pk.to_pem())
    seal_pub = tmp_path / "seal.pub.pem"
    seal_pub.write_bytes(
        SoftwareSigner.generate(tmp_path / "seal.key", "ed25519", PASS.encode()).to_pem()
    )
    exe = [sys.executable, "-m", "otaguard.cli.main"]
    tok = subprocess.run(
        [*exe, "signing", "token", "--requester", "ci"],
        capture_output=True, text=True, env=env, check=True, timeout=60,
    )  # fmt: skip
    entry = json.loads(tok.stdout)
    token = re.search(r"(otg_\S+)", tok.stderr)
    assert token is not None and entry["role"] == "release"
    (tmp_path / "policy.json").write_text(
        json.dumps({"version": 1, "requesters": {"ci": [{"vendor": "example.com"}]}})
    )
    (tmp_path / "signing.json").write_text(
        json.dumps(
            {
                "version": 1,
                "signer": {"key_file": "svc.key"},
                "audit_sealer": {"key_file": "seal.key"},
                "audit_log": "audit.log",
                "state": "state.sqlite",
                "policy": "policy.json",
                "seal_every": 1,
                "tokens": [entry],
            }
        )
    )
    proc = subprocess.Popen(
        [*exe, "signing", "serve", "--config", tmp_path / "signing.json", "--port", "0"],
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        url = None
        deadline = time.monotonic() + 30
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            m = re.search(r"listening on (http://\S+)", line)
            url = m.group(1) if m else None
        assert url, "service did not start"
        ok = False
        while not ok and time.monotonic() < deadline:
            try:
                import httpx

                ok = httpx.get(f"{url}/v1/health", timeout=1).status_code == 200
            except httpx.HTTPError:
                time.sleep(0.05)
        os.environ["OTAGUARD_SIGNING_TOKEN"] = token.group(1)
        try:
            rc, _, err = run(
                capsys, *release_args(image, tmp_path / "rel"), "--signing-url", url,
                "--trust-key", pub,
            )  # fmt: skip
        finally:
            del os.environ["OTAGUARD_SIGNING_TOKEN"]
        assert rc == 0, err
        check_release(tmp_path / "rel", pub, image)
    finally:
        proc.terminate()
        proc.wait(20)
    rc, _, err = run(
        capsys, "audit", "verify", tmp_path / "audit.log", "--key", seal_pub,
        "--state", tmp_path / "state.sqlite",
    )  # fmt: skip
    assert rc == 0, err
    # the release key is not the sealer
    rc, _, err = run(
        capsys, "audit", "verify", tmp_path / "audit.log", "--key", pub, "--unanchored"
    )
    assert rc == 1 and "E_AUDIT_SEAL" in err


def test_signing_serve_refuses_its_signing_key_as_sealer(tmp_path: Path) -> None:
    env = {**os.environ, "OTAGUARD_KEY_PASSPHRASE": PASS}
    SoftwareSigner.generate(tmp_path / "svc.key", "ed25519", PASS.encode())
    (tmp_path / "policy.json").write_text(json.dumps({"version": 1, "requesters": {}}))
    cfg = {
        "version": 1, "signer": {"key_file": "svc.key"}, "audit_log": "audit.log",
        "state": "state.sqlite", "policy": "policy.json", "tokens": [],
    }  # fmt: skip
    for sealer, code in ((None, "E_MALFORMED"), ({"key_file": "svc.key"}, "E_CONFIG")):
        body = dict(cfg) if sealer is None else {**cfg, "audit_sealer": sealer}
        (tmp_path / "signing.json").write_text(json.dumps(body))
        proc = subprocess.run(
            [sys.executable, "-m", "otaguard.cli.main", "signing", "serve",
             "--config", tmp_path / "signing.json", "--port", "0"],
            capture_output=True, text=True, env=env, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 1 and code in proc.stderr, proc.stderr
        assert not (tmp_path / "audit.log").exists()


def test_parse_expires() -> None:
    now = 1_800_000_000
    assert parse_expires("+30d", now) == now + 30 * 86400
    assert parse_expires("+12h", now) == now + 12 * 3600
    assert parse_expires(None, now) is None
    assert parse_expires("2027-01-31", now) == 1801439999
    assert parse_expires("2027-01-31T00:00:00Z", now) == 1801353600
    for bad in ("tomorrow", "+3w", "31/01/2027"):
        with pytest.raises(OtaError) as ei:
            parse_expires(bad, now)
        assert ei.value.code == ErrorCode.USAGE


def test_fast_forward_needs_the_flag(
    tmp_path: Path, keyfile: tuple[Path, Path], image: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """G4: a counter jump beyond the policy's step is refused unless explicitly authorized."""
    key, pub = keyfile
    log = tmp_path / "audit.log"
    signing = ["--key-file", key, "--audit-log", log]
    rc, _, _ = run(capsys, *release_args(image, tmp_path / "r1"), *signing)
    assert rc == 0
    jump = release_args(image, tmp_path / "r2", version="1.5.0", security_counter="200")
    rc, _, err = run(capsys, *jump, *signing)
    assert rc == 1 and "E_FAST_FORWARD" in err
    assert not (tmp_path / "r2").exists() and not list(tmp_path.glob(".r2.tmp-*"))
    rc, stdout, err = run(capsys, *jump, *signing, "--fast-forward", "--json")
    assert rc == 0 and "FAST-FORWARD" in err
    summary = json.loads(stdout)
    assert summary["fast_forward"] is True and summary["security_counter"] == 200
    assert json.loads((tmp_path / "r2" / "release.json").read_text()) == summary
    rc, stdout, _ = run(
        capsys, "manifest", "verify", tmp_path / "r2" / "manifest.suit", "--key", pub, "--json"
    )
    assert rc == 0 and json.loads(stdout)["security_counter"] == 200
