"""Signature algorithm per device class (issue 18): chosen at `keys authorize --class-alg`,
enforced again by `release create --class-algs`, and a request for an algorithm the class
cannot verify is refused with E_ALGORITHM before anything is signed."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import cbor2
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from otaguard.crypto.algorithms import CoseAlg
from otaguard.crypto.keys import PublicKey
from otaguard.crypto.software import SoftwareSigner
from otaguard.errors import CryptoError, ErrorCode, FormatError, UsageError
from otaguard.manifest.class_algs import ClassAlgs, envelope_algs, parse_class_alg
from otaguard.manifest.ids import class_id, vendor_id
from otaguard.trust.documents import parse_keylist

from .test_cli_keys import run
from .test_release_cli import PASS, release_args
from .test_signing_http import Service, run_server

VENDOR = "hvac.example.com"
VID = vendor_id(VENDOR)
CLASS = class_id(VID, "ctl-9", "rev-b")


@pytest.fixture
def d(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("OTAGUARD_KEY_PASSPHRASE", PASS)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def keygen(capsys: pytest.CaptureFixture[str], d: Path, name: str, kind: str) -> None:
    rc, _, err = run(
        capsys, "keys", "generate", "--kind", kind, "--key-file", str(d / f"{name}.key"),
        "--out-public", str(d / f"{name}.pub"),
    )  # fmt: skip
    assert rc == 0, err


def authorize(
    capsys: pytest.CaptureFixture[str], d: Path, name: str, *extra: str
) -> tuple[int, str, str]:
    return run(
        capsys, "keys", "authorize", "--key-file", str(d / "root.key"),
        "--public-key", str(d / f"{name}.pub"), "--vendor", VENDOR, "--class", "ctl-9:rev-b",
        "--keylist", str(d / "keylist.cose"), "--json", *extra,
    )  # fmt: skip


@pytest.fixture
def ceremony(d: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    rc, _, err = run(
        capsys, "keys", "init-root", "--key-file", str(d / "root.key"),
        "--out-public", str(d / "root.pub"),
    )  # fmt: skip
    assert rc == 0, err
    keygen(capsys, d, "ed", "ed25519")
    keygen(capsys, d, "p256", "p256")
    return d


def _keylist(d: Path) -> bytes:
    return (d / "keylist.cose").read_bytes()


TABLE = "keylist.cose.class-algs.json"


def test_authorize_refuses_a_key_the_class_cannot_verify(
    ceremony: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = ceremony
    # an Ed25519 key for a class whose SUIT processor has only ESP256: refused before signing
    rc, _, err = authorize(capsys, d, "ed", "--class-alg", "ctl-9:rev-b=esp256")
    assert rc == 1 and "error E_ALGORITHM" in err and "cannot verify" in err
    assert not (d / "keylist.cose").exists() and not (d / TABLE).exists()
    # a P-256 key defaults to ESP256; a class that knows only ES256 refuses it ...
    rc, _, err = authorize(capsys, d, "p256", "--class-alg", "ctl-9:rev-b=es256")
    assert rc == 1 and "error E_ALGORITHM" in err
    # ... an algorithm that does not fit the key is refused too ...
    rc, _, err = authorize(capsys, d, "p256", "--key-alg", "eddsa")
    assert rc == 1 and "error E_ALGORITHM" in err
    assert not (d / "keylist.cose").exists()
    # ... and with --key-alg es256 it is authorized, the algorithm recorded in its authorization
    rc, out, err = authorize(
        capsys, d, "p256", "--key-alg", "es256", "--class-alg", "ctl-9:rev-b=es256,esp256"
    )
    assert rc == 0, err
    assert json.loads(out)["alg"] == "es256"
    root = PublicKey.from_pem((d / "root.pub").read_bytes())
    kl = parse_keylist(_keylist(d), root, {root.key_id: root})
    assert [a.alg for a in kl.authorizations] == [CoseAlg.ES256]
    table = ClassAlgs.from_json((d / TABLE).read_bytes())
    assert table.algs(CLASS) == {CoseAlg.ES256, CoseAlg.ESP256}
    # the recorded class keeps refusing: the Ed25519 key, now without repeating --class-alg
    before = _keylist(d)
    rc, _, err = authorize(capsys, d, "ed")
    assert rc == 1 and "error E_ALGORITHM" in err
    assert _keylist(d) == before


def test_authorize_class_alg_usage_errors(
    ceremony: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = ceremony
    for bad in ("ctl-9:rev-b", "ctl-9=esp256", "ctl-9:rev-b="):
        rc, _, err = authorize(capsys, d, "p256", "--class-alg", bad)
        assert rc == 2 and "error E_USAGE" in err, bad
    rc, _, err = authorize(capsys, d, "p256", "--class-alg", "other:rev-a=esp256")
    assert rc == 2 and "not in --class" in err
    rc, _, err = authorize(capsys, d, "p256", "--class-alg", "ctl-9:rev-b=rsa")
    assert rc == 1 and "error E_ALGORITHM" in err
    assert not (d / "keylist.cose").exists()


def _table(d: Path, algs: str, klass: str = "thermo:B") -> Path:
    vid = vendor_id("example.com")
    cid, label, chosen = parse_class_alg(f"{klass}={algs}", "example.com", vid)
    path = d / "classes.json"
    path.write_bytes(ClassAlgs().with_entry(cid, label, chosen).to_json())
    return path


def test_release_create_refuses_a_signer_the_class_cannot_verify(
    d: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = d / "fw.bin"
    image.write_bytes(b"\x42" * 5000)
    ed_key = d / "ed.key"
    SoftwareSigner.generate(ed_key, "ed25519", PASS.encode())
    p_key = d / "p.key"
    SoftwareSigner.generate(p_key, "p256", PASS.encode())
    table = _table(d, "esp256")
    log = d / "audit.log"
    rc, _, err = run(
        capsys, *release_args(image, d / "rel"), "--key-file", str(ed_key),
        "--audit-log", str(log), "--class-algs", str(table),
    )  # fmt: skip
    assert rc == 1 and "error E_ALGORITHM" in err and "example.com/thermo:B" in err
    assert not (d / "rel").exists() and not log.exists()  # nothing signed, nothing audited
    rc, _, err = run(
        capsys, *release_args(image, d / "rel"), "--key-file", str(p_key), "--alg", "es256",
        "--audit-log", str(log), "--class-algs", str(table),
    )  # fmt: skip
    assert rc == 1 and "error E_ALGORITHM" in err and not log.exists()
    rc, _, err = run(
        capsys, *release_args(image, d / "rel"), "--key-file", str(p_key),
        "--audit-log", str(log), "--class-algs", str(table),
    )  # fmt: skip
    assert rc == 0, err
    assert envelope_algs((d / "rel" / "manifest.suit").read_bytes()) == [CoseAlg.ESP256]
    # a class the table does not list is not restricted
    rc, _, err = run(
        capsys, *release_args(image, d / "rel2", model="other"), "--key-file", str(ed_key),
        "--audit-log", str(d / "audit2.log"), "--class-algs", str(table),
    )  # fmt: skip
    assert rc == 0, err


def test_release_create_refuses_a_signing_service_key_the_class_cannot_verify(
    d: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    image = d / "fw.bin"
    image.write_bytes(b"\x42" * 5000)
    s = Service(d / "svc")  # an Ed25519 service key
    monkeypatch.setenv("OTAGUARD_SIGNING_TOKEN", s.tokens["ci"])
    args = release_args(image, d / "rel", hw_rev="A")
    with run_server(s.app) as url:
        table = _table(d, "es256", "thermo:A")
        rc, _, err = run(capsys, *args, "--signing-url", url, "--class-algs", table)
    assert rc == 1 and "error E_ALGORITHM" in err
    assert not (d / "rel").exists()
    s.service.close()
    ops = [json.loads(line)["op"] for line in s.log_path.read_text().splitlines()]
    assert "sign-manifest" not in ops  # refused before the service signed


def test_class_table_is_strict() -> None:
    cid = uuid.uuid4()
    table = ClassAlgs().with_entry(cid, "v/m:h", frozenset({CoseAlg.ES256}))
    assert ClassAlgs.from_json(table.to_json()) == table
    table.require(cid, [CoseAlg.ES256], "k")
    table.require(uuid.uuid4(), [CoseAlg.ED25519], "k")  # unlisted class: unrestricted
    with pytest.raises(CryptoError) as e:
        table.require(cid, [CoseAlg.ESP256], "k")
    assert e.value.code == ErrorCode.ALGORITHM
    with pytest.raises(CryptoError) as e:
        table.require_kind(cid, "ed25519", "k")
    assert e.value.code == ErrorCode.ALGORITHM
    for bad in (b"{}", b"[]", b"not json", b'{"format": "otaguard/class-algs/v1", "classes": '
                b'{"x": {"class": "c", "algs": ["es256"]}}}',
                b'{"format": "otaguard/class-algs/v1", "classes": '
                b'{"%s": {"class": "c", "algs": []}}}' % str(cid).encode()):  # fmt: skip
        with pytest.raises(FormatError) as fe:
            ClassAlgs.from_json(bad)
        assert fe.value.code == ErrorCode.MALFORMED
    with pytest.raises(UsageError):
        parse_class_alg("m:h", "v", uuid.uuid4())


def test_envelope_algs_reads_every_block() -> None:
    from otaguard.device.lab import Lab, image_bytes

    lab = Lab(kind="p256")
    other = SoftwareSigner(ed25519.Ed25519PrivateKey.generate(), CoseAlg.EDDSA)
    env = lab.release(image_bytes(100, 1), version="1.0.0", seq=1, signers=[lab.op, other])
    assert envelope_algs(env) == [CoseAlg.ESP256, CoseAlg.EDDSA]
    assert cbor2.loads(env).tag == 107
