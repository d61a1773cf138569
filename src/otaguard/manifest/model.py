"""What an otaguard manifest says, independent of its SUIT encoding.

:class:`ManifestInfo` is the profile: one image for one (vendor, class), with version, rollback
and expiry data. :mod:`.build` turns it into a SUIT envelope and :mod:`.verify` turns a verified
envelope back into it; both go through :mod:`.profile`, so the mapping lives in one place.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from ..crypto.algorithms import HASH_SIZES, HashAlg
from ..errors import ErrorCode, FormatError
from .version import parse_version

MAX_URI = 1024
MAX_TEXT_VALUE = 1024
MAX_TEXT_ENTRIES = 16
MAX_UINT64 = 2**64 - 1


@dataclass(frozen=True)
class DeltaInfo:
    """Present only in a delta release: the patch that turns ``base`` into the final image."""

    base_digest: bytes  # digest (same alg as the image) of the image the patch applies to
    patch_digest: bytes
    patch_size: int
    patch_uri: str | None


@dataclass(frozen=True)
class ManifestInfo:
    sequence_number: int
    vendor_id: uuid.UUID
    class_id: uuid.UUID
    digest_alg: HashAlg
    image_digest: bytes  # digest of the FINAL image
    image_size: int  # size of the FINAL image
    version: str  # "X.Y.Z"
    min_version: str | None  # minimum running version the device must have
    security_counter: int
    expires: int | None  # POSIX seconds (SUIT use-before)
    uri: str | None  # where to fetch the full image
    text: dict[str, str] = field(default_factory=dict)  # model, hw_rev, description...
    delta: DeltaInfo | None = None

    def validate(self) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
        """Raise E_MALFORMED unless every field is within the profile's ranges.

        Returns the parsed (version, min_version), which the encoder needs anyway."""
        _uint(self.sequence_number, "sequence_number")
        _uint(self.security_counter, "security_counter")
        _uint(self.image_size, "image_size")
        if self.expires is not None:
            _uint(self.expires, "expires")
        if not isinstance(self.vendor_id, uuid.UUID) or not isinstance(self.class_id, uuid.UUID):
            raise FormatError(ErrorCode.MALFORMED, "vendor_id/class_id must be UUIDs")
        alg = HashAlg(self.digest_alg)
        _digest(self.image_digest, alg, "image_digest")
        version = parse_version(self.version)
        minimum = None if self.min_version is None else parse_version(self.min_version)
        if self.uri is not None:
            _uri(self.uri, "uri")
        if not isinstance(self.text, dict) or len(self.text) > MAX_TEXT_ENTRIES:
            raise FormatError(ErrorCode.MALFORMED, "text must be a small str->str map")
        for k, v in self.text.items():
            if not isinstance(k, str) or not isinstance(v, str) or not k:
                raise FormatError(ErrorCode.MALFORMED, "text keys and values must be strings")
            if len(v.encode()) > MAX_TEXT_VALUE:
                raise FormatError(ErrorCode.MALFORMED, f"text {k!r} too long")
        if self.delta is not None:
            d = self.delta
            _digest(d.base_digest, alg, "delta.base_digest")
            _digest(d.patch_digest, alg, "delta.patch_digest")
            _uint(d.patch_size, "delta.patch_size")
            if d.patch_uri is not None:
                _uri(d.patch_uri, "delta.patch_uri")
        return version, minimum


def _uint(v: object, what: str) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 0 or v > MAX_UINT64:
        raise FormatError(ErrorCode.MALFORMED, f"{what} must be an unsigned 64-bit integer")


def _digest(v: object, alg: HashAlg, what: str) -> None:
    if not isinstance(v, bytes) or len(v) != HASH_SIZES[alg]:
        raise FormatError(ErrorCode.MALFORMED, f"{what} must be {HASH_SIZES[alg]} bytes")


def _uri(v: object, what: str) -> None:
    if not isinstance(v, str) or not v or len(v.encode()) > MAX_URI:
        raise FormatError(ErrorCode.MALFORMED, f"{what} must be a non-empty string <= {MAX_URI}")


def info_to_dict(info: ManifestInfo) -> dict[str, object]:
    """JSON-friendly view (bytes as hex, UUIDs as strings) for the CLI and reports."""
    out: dict[str, object] = {
        "sequence_number": info.sequence_number,
        "vendor_id": str(info.vendor_id),
        "class_id": str(info.class_id),
        "digest_alg": HashAlg(info.digest_alg).name.lower(),
        "image_digest": info.image_digest.hex(),
        "image_size": info.image_size,
        "version": info.version,
        "min_version": info.min_version,
        "security_counter": info.security_counter,
        "expires": info.expires,
        "uri": info.uri,
        "text": dict(info.text),
        "delta": None,
    }
    if info.delta is not None:
        out["delta"] = {
            "base_digest": info.delta.base_digest.hex(),
            "patch_digest": info.delta.patch_digest.hex(),
            "patch_size": info.delta.patch_size,
            "patch_uri": info.delta.patch_uri,
        }
    return out
