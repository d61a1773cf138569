"""The trust bundle provisioned into devices at manufacturing: root public key + key list.

The bundle itself is not signed: the root public key inside it is checked against the hash
fused into the device's OTP, and the key list inside is verified against that root. A
tampered bundle therefore fails on the device, not just in transport.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .. import cbor
from ..crypto.keys import PublicKey
from ..errors import ErrorCode, FormatError
from .documents import MAX_KEYLIST
from .store import TrustStore

DOC_BUNDLE = "otaguard/trust-bundle/v1"
MAX_BUNDLE = MAX_KEYLIST + 1024
_LIMITS = cbor.Limits(max_size=MAX_BUNDLE, max_depth=10, max_items=8192)


@dataclass(frozen=True)
class TrustBundle:
    root: PublicKey
    keylist: bytes

    @property
    def root_hash(self) -> bytes:
        """What goes into OTP: SHA-256 of the root's COSE_Key thumbprint input."""
        return self.root.thumbprint

    def to_bytes(self) -> bytes:
        return cbor.dumps({1: DOC_BUNDLE, 2: self.root.to_cose_key(), 3: self.keylist})

    @classmethod
    def load(cls, data: bytes) -> TrustBundle:
        obj = cbor.loads(data, _LIMITS)
        if not isinstance(obj, dict) or obj.get(1) != DOC_BUNDLE:
            raise FormatError(ErrorCode.MALFORMED, "not an otaguard trust bundle")
        keylist = obj.get(3)
        if not isinstance(keylist, bytes):
            raise FormatError(ErrorCode.MALFORMED, "trust bundle has no key list")
        bundle = cls(PublicKey.from_cose_key(obj.get(2)), keylist)
        bundle.store()  # verify now: a bundle that does not verify is not a bundle
        return bundle

    def store(self) -> TrustStore:
        return TrustStore.create(self.root, self.keylist)

    def fingerprint(self) -> str:
        return hashlib.sha256(self.to_bytes()).hexdigest()
