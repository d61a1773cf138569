"""A securesystemslib ``Signer`` around otaguard's own :class:`~otaguard.crypto.cose.Signer`.

python-tuf signs through securesystemslib's interface; wrapping ours (rather than using
securesystemslib's HSM signer) keeps one PKCS#11 path for SUIT and TUF: the same token
session, PIN handling and key lookup, and the same two key types (Ed25519 and P-256).
"""

from __future__ import annotations

from securesystemslib.signer import Key, Signature, SSlibKey
from securesystemslib.signer import Signer as SslibSigner

from ..crypto.cose import Signer
from ..crypto.keys import PublicKey, raw_ecdsa_to_der

# securesystemslib's scheme names for otaguard's two key kinds
SCHEMES = {"ed25519": "ed25519", "p256": "ecdsa-sha2-nistp256"}


def tuf_key(public: PublicKey) -> SSlibKey:
    """The TUF key object (keyid = securesystemslib's default, a hash of the key's JSON)."""
    return SSlibKey.from_crypto(public.crypto_key, scheme=SCHEMES[public.kind])


class TufSigner(SslibSigner):
    """Signs TUF payloads with an otaguard signer; ECDSA signatures go out DER-encoded, the
    form securesystemslib verifies (otaguard's signers return COSE's raw r||s)."""

    def __init__(self, signer: Signer) -> None:
        self._signer = signer
        self._key = tuf_key(signer.public_key)

    @property
    def public_key(self) -> Key:
        return self._key

    def sign(self, payload: bytes) -> Signature:
        sig = self._signer.sign(payload)
        if self._signer.public_key.kind == "p256":
            sig = raw_ecdsa_to_der(sig)
        return Signature(self._key.keyid, sig.hex())

    @classmethod
    def from_priv_key_uri(
        cls, priv_key_uri: str, public_key: Key, secrets_handler: object = None
    ) -> SslibSigner:
        raise NotImplementedError("open the key with otaguard's signer and wrap it")
