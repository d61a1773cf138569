"""PublicKey encodings and refusals; the development software key file."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

from otaguard.crypto.algorithms import CoseAlg, KeyKind
from otaguard.crypto.keys import PublicKey, der_ecdsa_to_raw, raw_ecdsa_to_der
from otaguard.crypto.software import SoftwareSigner, generate_private_key
from otaguard.errors import ErrorCode, OtaError

PASS = b"correct horse battery"
KINDS: list[KeyKind] = ["ed25519", "p256"]


def _code(fn: object, *args: object, **kw: object) -> ErrorCode:
    with pytest.raises(OtaError) as e:
        fn(*args, **kw)  # type: ignore[operator]
    return e.value.code


@pytest.mark.parametrize("kind", KINDS)
def test_round_trips(kind: KeyKind) -> None:
    pub = PublicKey(generate_private_key(kind).public_key())
    assert PublicKey.from_pem(pub.to_pem()) == pub
    assert PublicKey.from_der(pub.to_der()) == pub
    assert PublicKey.from_raw(kind, pub.raw) == pub
    assert PublicKey.from_cose_key(pub.to_cose_key()) == pub
    ck = pub.to_cose_key(with_kid=True)
    assert ck[2] == pub.key_id and len(pub.key_id) == 16
    assert PublicKey.from_cose_key(ck) == pub
    assert hash(PublicKey.from_pem(pub.to_pem())) == hash(pub)
    assert pub.default_alg == (CoseAlg.ED25519 if kind == "ed25519" else CoseAlg.ESP256)
    assert len(pub.raw) == (32 if kind == "ed25519" else 65)


def test_thumbprint_matches_rfc9679_example() -> None:
    # RFC 9679 §6 example: EC2 P-256 key (only the required parameters are hashed)
    x = bytes.fromhex("65eda5a12577c2bae829437fe338701a10aaa375e1bb5b5de108de439c08551d")
    y = bytes.fromhex("1e52ed75701163f7f9e40ddf9f341b3dc9ba860af7e0ca7ca7e9eecd0084d19c")
    pub = PublicKey.from_cose_key({1: 2, -1: 1, -2: x, -3: y, 2: b"ignored kid"})
    assert (
        pub.thumbprint.hex() == "496bd8afadf307e5b08c64b0421bf9dc01528a344a43bda88fadd1669da253ec"
    )


def test_distinct_keys_differ() -> None:
    a = PublicKey(generate_private_key("ed25519").public_key())
    b = PublicKey(generate_private_key("ed25519").public_key())
    assert a != b and a.key_id != b.key_id


@pytest.mark.parametrize(
    "key",
    [
        rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key(),
        ec.generate_private_key(ec.SECP384R1()).public_key(),
        ec.generate_private_key(ec.SECP256K1()).public_key(),
        ed448.Ed448PrivateKey.generate().public_key(),
    ],
    ids=["rsa", "p384", "secp256k1", "ed448"],
)
def test_other_key_types_refused(key: object) -> None:
    assert _code(PublicKey, key) == ErrorCode.ALGORITHM
    pem = key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert _code(PublicKey.from_pem, pem) == ErrorCode.ALGORITHM


def test_private_signer_refuses_rsa_and_p384() -> None:
    assert (
        _code(SoftwareSigner, rsa.generate_private_key(public_exponent=65537, key_size=2048))
        == ErrorCode.ALGORITHM
    )
    assert _code(SoftwareSigner, ec.generate_private_key(ec.SECP384R1())) == ErrorCode.ALGORITHM
    assert _code(generate_private_key, "rsa") == ErrorCode.ALGORITHM


@pytest.mark.parametrize(
    "cose_key",
    [
        {1: 3, -1: b"\x01\x00\x01", -2: b"\x00" * 256},  # RSA
        {1: 2, -1: 2, -2: b"\x00" * 48, -3: b"\x00" * 48},  # P-384
        {1: 1, -1: 4, -2: b"\x00" * 32},  # X25519
        {1: 1, -1: 7, -2: b"\x00" * 57},  # Ed448
    ],
)
def test_cose_key_other_algorithms_refused(cose_key: dict[int, object]) -> None:
    assert _code(PublicKey.from_cose_key, cose_key) == ErrorCode.ALGORITHM


@pytest.mark.parametrize(
    "cose_key",
    [
        [1, 2],
        {1: 1, -1: 6, -2: b"\x00" * 31},  # short Ed25519
        {1: 2, -1: 1, -2: b"\x00" * 32},  # missing y
        {1: 2, -1: 1, -2: b"\x00" * 31, -3: b"\x00" * 32},
        {1: 2, -1: 1, -2: b"\x01" * 32, -3: b"\x01" * 32},  # not on the curve
    ],
)
def test_cose_key_malformed(cose_key: object) -> None:
    assert _code(PublicKey.from_cose_key, cose_key) == ErrorCode.KEY_FORMAT


def test_pem_garbage_and_private_pem() -> None:
    assert _code(PublicKey.from_pem, b"not a key") == ErrorCode.KEY_FORMAT
    assert _code(PublicKey.from_der, b"\x30\x03\x02\x01\x00") == ErrorCode.KEY_FORMAT
    priv = ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    assert _code(PublicKey.from_pem, priv) == ErrorCode.KEY_FORMAT


def test_verify_refuses_alg_key_mismatch_and_bad_signatures() -> None:
    ed = SoftwareSigner(generate_private_key("ed25519"))
    p = SoftwareSigner(generate_private_key("p256"))
    sig_ed = ed.sign(b"m")
    sig_p = p.sign(b"m")
    ed.public_key.verify(CoseAlg.EDDSA, sig_ed, b"m")
    p.public_key.verify(CoseAlg.ES256, sig_p, b"m")
    assert _code(ed.public_key.verify, CoseAlg.ES256, sig_ed, b"m") == ErrorCode.ALGORITHM
    assert _code(p.public_key.verify, CoseAlg.ED25519, sig_p, b"m") == ErrorCode.ALGORITHM
    assert _code(p.public_key.verify, -35, sig_p, b"m") == ErrorCode.ALGORITHM  # ES384
    assert _code(p.public_key.verify, -257, sig_p, b"m") == ErrorCode.ALGORITHM  # RS256
    assert _code(ed.public_key.verify, True, sig_ed, b"m") == ErrorCode.ALGORITHM
    assert _code(ed.public_key.verify, CoseAlg.ED25519, sig_ed, b"n") == ErrorCode.SIGNATURE
    assert _code(ed.public_key.verify, CoseAlg.ED25519, sig_ed[:-1], b"m") == ErrorCode.SIGNATURE
    assert _code(p.public_key.verify, CoseAlg.ESP256, sig_p[:-1], b"m") == ErrorCode.SIGNATURE
    bad = bytes([sig_p[0] ^ 1]) + sig_p[1:]
    assert _code(p.public_key.verify, CoseAlg.ESP256, bad, b"m") == ErrorCode.SIGNATURE
    # DER instead of raw r||s is refused (COSE requires fixed-width r||s)
    assert (
        _code(p.public_key.verify, CoseAlg.ESP256, raw_ecdsa_to_der(sig_p), b"m")
        == ErrorCode.SIGNATURE
    )
    assert der_ecdsa_to_raw(raw_ecdsa_to_der(sig_p)) == sig_p
    assert _code(der_ecdsa_to_raw, b"\x30\x00junk") == ErrorCode.SIGNATURE
    # an all-zero r||s never verifies
    assert _code(p.public_key.verify, CoseAlg.ESP256, bytes(64), b"m") == ErrorCode.SIGNATURE


# --- software key files ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_key_file_generate_load_sign(tmp_path: Path, kind: KeyKind) -> None:
    path = tmp_path / "dev.key"
    pub = SoftwareSigner.generate(path, kind, PASS)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert b"BEGIN ENCRYPTED PRIVATE KEY" in path.read_bytes()
    signer = SoftwareSigner.load(path, PASS)
    assert signer.public_key == pub
    sig = signer.sign(b"hello")
    pub.verify(signer.alg, sig, b"hello")


def test_key_file_refusals(tmp_path: Path) -> None:
    path = tmp_path / "dev.key"
    SoftwareSigner.generate(path, "ed25519", PASS)
    before = path.read_bytes()
    assert _code(SoftwareSigner.generate, path, "p256", PASS) == ErrorCode.EXISTS
    assert path.read_bytes() == before
    assert _code(SoftwareSigner.load, path, b"wrong passphrase") == ErrorCode.PIN
    assert _code(SoftwareSigner.load, path, b"") == ErrorCode.PIN
    assert _code(SoftwareSigner.generate, tmp_path / "short.key", "ed25519", b"1234567") == (
        ErrorCode.PIN
    )
    assert not (tmp_path / "short.key").exists()
    assert _code(SoftwareSigner.load, path, PASS, CoseAlg.ESP256) == ErrorCode.ALGORITHM


def test_unencrypted_key_files_refused(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    plain = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "plain.key").write_bytes(plain)
    assert _code(SoftwareSigner.load, tmp_path / "plain.key", PASS) == ErrorCode.KEY_FORMAT
    # the marker string alone does not get an unencrypted key through
    (tmp_path / "sneaky.key").write_bytes(plain + b"# ENCRYPTED PRIVATE KEY\n")
    assert _code(SoftwareSigner.load, tmp_path / "sneaky.key", PASS) == ErrorCode.KEY_FORMAT
    # Not a key: a PEM frame around 3 bytes of junk (the label is assembled so that no
    # key-looking block sits in the repository).
    label = b"ENCRYPTED " + b"PRIVATE KEY-----"
    (tmp_path / "junk.key").write_bytes(
        b"-----BEGIN " + label + b"\nAAAA\n-----END " + label + b"\n"
    )
    assert _code(SoftwareSigner.load, tmp_path / "junk.key", PASS) == ErrorCode.KEY_FORMAT
    (tmp_path / "huge.key").write_bytes(b"A" * (64 * 1024))
    assert _code(SoftwareSigner.load, tmp_path / "huge.key", PASS) == ErrorCode.TOO_LARGE


def test_warning_logged_on_every_sign(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "dev.key"
    SoftwareSigner.generate(path, "p256", PASS)
    signer = SoftwareSigner.load(path, PASS)
    with caplog.at_level(logging.WARNING, logger="otaguard.keys"):
        for _ in range(3):
            signer.sign(b"x")
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 3
    assert all(
        "DEVELOPMENT KEY" in r.getMessage() and str(path) in r.getMessage() for r in warnings
    )
    assert all(PASS.decode() not in r.getMessage() for r in warnings)


def test_every_wrong_passphrase_is_e_pin(tmp_path: Path) -> None:
    """Regression (flaky before): about 1 wrong passphrase in 256 leaves valid-looking padding
    and made `cryptography` report a parse error, which came out as E_KEY_FORMAT. The file is
    a well-formed encrypted container, so every wrong passphrase is E_PIN."""
    path = tmp_path / "dev.key"
    SoftwareSigner.generate(path, "ed25519", PASS)
    codes = {_code(SoftwareSigner.load, path, b"wrong-%d" % i) for i in range(1000)}
    assert codes == {ErrorCode.PIN}
