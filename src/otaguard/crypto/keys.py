"""Public keys: parsing (PEM, DER, COSE_Key), key ids, and signature verification.

One narrow type, :class:`PublicKey`, is what the rest of otaguard passes around. It only ever
holds an Ed25519 or P-256 key; RSA and other curves are refused at construction, so no code
path further down can be tricked into verifying with a weak or unexpected key type.
"""

from __future__ import annotations

import hashlib
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from .. import cbor
from ..errors import CryptoError, ErrorCode
from .algorithms import ALG_KEY_KIND, DEFAULT_ALG, CoseAlg, KeyKind, cose_alg

# COSE_Key labels (RFC 9052 §7, RFC 9053 §7)
KTY, KID, ALG = 1, 2, 3
CRV, X, Y = -1, -2, -3
KTY_OKP, KTY_EC2 = 1, 2
CRV_P256, CRV_ED25519 = 1, 6

KEY_ID_LEN = 16
P256_COORD = 32

PublicKeyObject = ed25519.Ed25519PublicKey | ec.EllipticCurvePublicKey
_ECDSA_SHA256 = ec.ECDSA(hashes.SHA256())  # immutable; built once, not per verification


def raw_ecdsa_to_der(sig: bytes) -> bytes:
    if len(sig) != 2 * P256_COORD:
        raise CryptoError(ErrorCode.SIGNATURE, "ECDSA P-256 signature must be 64 bytes (r||s)")
    r = int.from_bytes(sig[:P256_COORD], "big")
    s = int.from_bytes(sig[P256_COORD:], "big")
    return encode_dss_signature(r, s)


def der_ecdsa_to_raw(sig: bytes) -> bytes:
    """Tokens and OpenSSL emit DER; COSE wants fixed-width r||s (RFC 9053 §2.1)."""
    try:
        r, s = decode_dss_signature(sig)
    except ValueError:
        raise CryptoError(ErrorCode.SIGNATURE, "not a DER ECDSA signature") from None
    return r.to_bytes(P256_COORD, "big") + s.to_bytes(P256_COORD, "big")


def _refuse(obj: object) -> CryptoError:
    if isinstance(obj, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return CryptoError(
            ErrorCode.ALGORITHM, "RSA keys are refused: use Ed25519 (default) or ECDSA P-256"
        )
    if isinstance(obj, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return CryptoError(
            ErrorCode.ALGORITHM, f"curve {obj.curve.name} is refused: only P-256 is supported"
        )
    return CryptoError(ErrorCode.ALGORITHM, f"key type {type(obj).__name__} is refused")


class PublicKey:
    """An Ed25519 or P-256 public key, comparable and hashable by its encoding."""

    __slots__ = ("_key", "_raw", "kind")

    def __init__(self, key: object) -> None:
        if isinstance(key, ed25519.Ed25519PublicKey):
            self.kind: KeyKind = "ed25519"
            self._raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        elif isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
            self.kind = "p256"
            self._raw = key.public_bytes(
                serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
            )
        else:
            raise _refuse(key)
        self._key: PublicKeyObject = key

    # --- constructors ----------------------------------------------------------------------
    @classmethod
    def from_pem(cls, data: bytes) -> PublicKey:
        try:
            obj = serialization.load_pem_public_key(data)
        except ValueError as exc:
            raise CryptoError(ErrorCode.KEY_FORMAT, f"cannot parse PEM public key: {exc}") from None
        except Exception:
            raise CryptoError(ErrorCode.KEY_FORMAT, "cannot parse PEM public key") from None
        return cls(obj)

    @classmethod
    def from_der(cls, data: bytes) -> PublicKey:
        try:
            obj = serialization.load_der_public_key(data)
        except Exception:
            raise CryptoError(ErrorCode.KEY_FORMAT, "cannot parse DER public key") from None
        return cls(obj)

    @classmethod
    def from_raw(cls, kind: KeyKind, data: bytes) -> PublicKey:
        try:
            if kind == "ed25519":
                return cls(ed25519.Ed25519PublicKey.from_public_bytes(data))
            if kind == "p256":
                return cls(ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), data))
        except ValueError:
            raise CryptoError(ErrorCode.KEY_FORMAT, f"invalid {kind} public key bytes") from None
        raise CryptoError(ErrorCode.ALGORITHM, f"key kind {kind!r} is refused")

    @classmethod
    def from_cose_key(cls, obj: Any) -> PublicKey:
        if not isinstance(obj, dict):
            raise CryptoError(ErrorCode.KEY_FORMAT, "COSE_Key must be a map")
        kty, crv = obj.get(KTY), obj.get(CRV)
        x = obj.get(X)
        if kty == KTY_OKP and crv == CRV_ED25519 and isinstance(x, bytes):
            return cls.from_raw("ed25519", x)
        if kty == KTY_EC2 and crv == CRV_P256:
            y = obj.get(Y)
            if not (isinstance(x, bytes) and isinstance(y, bytes)):
                raise CryptoError(ErrorCode.KEY_FORMAT, "EC2 COSE_Key needs x and y bytes")
            if len(x) != P256_COORD or len(y) != P256_COORD:
                raise CryptoError(ErrorCode.KEY_FORMAT, "P-256 coordinates must be 32 bytes")
            return cls.from_raw("p256", b"\x04" + x + y)
        if kty == 3:
            raise CryptoError(ErrorCode.ALGORITHM, "RSA COSE_Key is refused")
        raise CryptoError(ErrorCode.ALGORITHM, f"COSE_Key kty={kty!r} crv={crv!r} is refused")

    # --- encodings ---------------------------------------------------------------------------
    @property
    def crypto_key(self) -> PublicKeyObject:
        return self._key

    @property
    def raw(self) -> bytes:
        """32-byte Ed25519 key or 65-byte uncompressed P-256 point."""
        return self._raw

    def to_cose_key(self, *, with_kid: bool = False) -> dict[int, Any]:
        if self.kind == "ed25519":
            m: dict[int, Any] = {KTY: KTY_OKP, CRV: CRV_ED25519, X: self._raw}
        else:
            m = {KTY: KTY_EC2, CRV: CRV_P256, X: self._raw[1:33], Y: self._raw[33:65]}
        if with_kid:
            m[KID] = self.key_id
        return m

    def to_pem(self) -> bytes:
        return self._key.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def to_der(self) -> bytes:
        return self._key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    @property
    def thumbprint(self) -> bytes:
        """RFC 9679 COSE Key Thumbprint (SHA-256 over the required parameters only)."""
        return hashlib.sha256(cbor.dumps(self.to_cose_key())).digest()

    @property
    def key_id(self) -> bytes:
        """The kid we put in COSE headers: the thumbprint, truncated to keep manifests small.

        A kid only selects a candidate key; the signature check is what authenticates, so a
        (astronomically unlikely) collision could at worst cause a verification failure.
        """
        return self.thumbprint[:KEY_ID_LEN]

    @property
    def default_alg(self) -> CoseAlg:
        return DEFAULT_ALG[self.kind]

    # --- verification --------------------------------------------------------------------
    def check_alg(self, alg: object) -> CoseAlg:
        a = cose_alg(alg)
        if ALG_KEY_KIND[a] != self.kind:
            raise CryptoError(
                ErrorCode.ALGORITHM, f"algorithm {a.name} does not match a {self.kind} key"
            )
        return a

    def verify(self, alg: object, signature: bytes, data: bytes) -> None:
        """Raise CryptoError(E_SIGNATURE) unless ``signature`` is valid over ``data``."""
        a = self.check_alg(alg)
        try:
            if isinstance(self._key, ed25519.Ed25519PublicKey):
                self._key.verify(signature, data)
            else:
                self._key.verify(raw_ecdsa_to_der(signature), data, _ECDSA_SHA256)
        except InvalidSignature:
            raise CryptoError(ErrorCode.SIGNATURE, f"{a.name} signature does not verify") from None

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PublicKey) and other._raw == self._raw

    def __hash__(self) -> int:
        return hash(self._raw)

    def __repr__(self) -> str:
        return f"PublicKey({self.kind}, kid={self.key_id.hex()})"
