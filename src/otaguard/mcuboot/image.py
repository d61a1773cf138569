"""MCUboot's signed image: header, image, protected TLVs (SEC_CNT), hash, key hash, signature.

Layout (MCUboot ``docs/design.md`` "Image format", little-endian)::

    header (32 bytes, zero-padded to hdr_size): magic 0x96f3b83d, load_addr, hdr_size,
        protect_tlv_size, img_size, flags, version (u8 major, u8 minor, u16 revision,
        u32 build), pad
    image (img_size bytes)
    protected TLV area:   info (0x6908, total) + SEC_CNT (0x50, u32)
    unprotected TLV area: info (0x6907, total) + SHA256 (0x10) + KEYHASH (0x01) +
        ED25519 (0x24, 64 bytes) or ECDSASIG (0x22, DER)

The SHA-256 covers header + image + protected TLV area. The signature is what MCUboot
(``bootutil``) and imgtool check: ECDSA P-256 over that same byte string (so the signer hashes it
with SHA-256 itself: exactly our Signer's ``sign(data)``), Ed25519 over the 32-byte digest.
KEYHASH is SHA-256 of the key's DER SubjectPublicKeyInfo, the form MCUboot embeds.

Building is split in two so an HSM (any :class:`Signer`) signs: :func:`prepare` checks every
bound (version fits the header, counter fits u32, image + TLVs + trailer fit the slot) before
anything is signed and returns the bytes to sign; :func:`finish` appends the TLVs. The parser is
strict (our own layout only: no flags, exactly these TLVs in this order, nothing after them),
bounds sizes before hashing, and :func:`verify_image` runs size → structure → digest → key →
signature, each with its own code.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from ..crypto.algorithms import CoseAlg, KeyKind
from ..crypto.cose import Signer
from ..crypto.keys import PublicKey, der_ecdsa_to_raw, raw_ecdsa_to_der
from ..errors import CryptoError, ErrorCode, FormatError, OtaError
from ..manifest.version import parse_version

IMAGE_MAGIC = 0x96F3B83D
HEADER_SIZE = 32
MAX_HEADER_SIZE = 0xFFFF
TLV_INFO_MAGIC = 0x6907
TLV_PROT_INFO_MAGIC = 0x6908
TLV_INFO_SIZE = 4
TLV_SIZE = 4

TLV_KEYHASH = 0x01
TLV_SHA256 = 0x10
TLV_ECDSASIG = 0x22
TLV_ED25519 = 0x24
TLV_SEC_CNT = 0x50

SIG_TLV: dict[KeyKind, int] = {"ed25519": TLV_ED25519, "p256": TLV_ECDSASIG}
MAX_ECDSA_DER = 72  # SEQUENCE of two INTEGERs of at most 33 bytes each
MAX_U8, MAX_U16, MAX_U32 = 0xFF, 0xFFFF, 0xFFFF_FFFF
MAX_MCUBOOT_IMAGE = 64 * 1024 * 1024  # hard bound before any work (MCU slots are far smaller)

_ECDSA_PREHASHED = ec.ECDSA(Prehashed(hashes.SHA256()))
_HDR = struct.Struct("<IIHHIIBBHII")
_INFO = struct.Struct("<HH")
_TLV = struct.Struct("<HH")
PROTECTED_SIZE = TLV_INFO_SIZE + TLV_SIZE + 4  # info + SEC_CNT
_DIGEST = 32
_UNPROT_FIXED = TLV_INFO_SIZE + 2 * (TLV_SIZE + _DIGEST)  # info + SHA256 + KEYHASH
MAX_UNPROTECTED_SIZE = _UNPROT_FIXED + TLV_SIZE + MAX_ECDSA_DER


def trailer_size(max_sectors: int = 128, write_size: int = 8) -> int:
    """Bytes MCUboot's swap upgrade keeps at the end of a slot (status area, swap size/info,
    copy-done, image-ok, 16-byte magic), as imgtool computes it for a swap-mode slot."""
    magic = -(-16 // write_size) * write_size
    return max_sectors * 3 * write_size + 4 * write_size + magic


DEFAULT_TRAILER = trailer_size()  # 3120: 128 sectors, 8-byte writes (imgtool's default)


@dataclass(frozen=True, order=True)
class ImageVersion:
    """MCUboot's version field: major.minor.revision+build (u8.u8.u16.u32)."""

    major: int
    minor: int = 0
    revision: int = 0
    build: int = 0

    @classmethod
    def from_release(cls, text: str) -> ImageVersion:
        """otaguard's X[.Y[.Z[.B]]] → the header field; E_FIELD_RANGE if it does not fit.

        A fourth component goes to ``build``; more components cannot be represented, so they
        are refused rather than dropped (two releases must never share one header version).
        """
        parts = parse_version(text)
        if len(parts) > 4:
            raise FormatError(
                ErrorCode.FIELD_RANGE,
                f"version {text!r} has {len(parts)} components; MCUboot holds at most 4",
            )
        major, minor, revision, build = (*parts, 0, 0, 0)[:4]
        for name, value, top in (
            ("major", major, MAX_U8),
            ("minor", minor, MAX_U8),
            ("revision", revision, MAX_U16),
            ("build", build, MAX_U32),
        ):
            if value > top:
                raise FormatError(
                    ErrorCode.FIELD_RANGE,
                    f"version {text!r}: {name} {value} does not fit MCUboot's field (max {top})",
                )
        return cls(major, minor, revision, build)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.revision}+{self.build}"


@dataclass(frozen=True)
class Geometry:
    """Where the image goes: the slot size bounds header + image + TLVs + trailer."""

    slot_size: int | None = None
    header_size: int = HEADER_SIZE
    trailer_size: int = DEFAULT_TRAILER

    def check(self) -> None:
        if not HEADER_SIZE <= self.header_size <= MAX_HEADER_SIZE:
            raise FormatError(
                ErrorCode.FIELD_RANGE,
                f"header size {self.header_size} outside {HEADER_SIZE}..{MAX_HEADER_SIZE}",
            )
        if self.trailer_size < 0 or (self.slot_size is not None and self.slot_size <= 0):
            raise FormatError(ErrorCode.FIELD_RANGE, "slot and trailer sizes must be positive")

    def check_fits(self, image_size: int) -> int:
        """The worst-case slot use of an image of ``image_size`` bytes; E_SLOT_FULL if over.

        Counts the largest signature TLV (ECDSA DER, 72 bytes) so the answer does not depend on
        which key signs; called before anything is signed.
        """
        self.check()
        if image_size <= 0 or image_size > min(MAX_U32, MAX_MCUBOOT_IMAGE):
            raise FormatError(ErrorCode.SLOT_FULL, f"image size {image_size} out of range")
        need = (
            self.header_size + image_size + PROTECTED_SIZE + MAX_UNPROTECTED_SIZE
            + self.trailer_size
        )  # fmt: skip
        if self.slot_size is not None and need > self.slot_size:
            raise FormatError(
                ErrorCode.SLOT_FULL,
                f"MCUboot image needs {need} bytes (header {self.header_size} + image "
                f"{image_size} + TLVs + trailer {self.trailer_size}); the slot has "
                f"{self.slot_size}",
            )
        return need


@dataclass(frozen=True)
class UnsignedImage:
    """Header + image + protected TLVs: what the hash covers and the signer is given."""

    payload: bytes
    digest: bytes  # SHA-256 of payload

    def message(self, kind: KeyKind) -> bytes:
        """What the signer signs: the digest (Ed25519) or the payload (ECDSA hashes it)."""
        return self.digest if kind == "ed25519" else self.payload


def check_counter(security_counter: int) -> None:
    if not 0 <= security_counter <= MAX_U32:
        raise FormatError(
            ErrorCode.FIELD_RANGE,
            f"security counter {security_counter} does not fit MCUboot's SEC_CNT (u32)",
        )


def prepare(
    image: bytes, version: ImageVersion, security_counter: int, geometry: Geometry
) -> UnsignedImage:
    """Check every bound, then lay out header + image + protected TLVs."""
    check_counter(security_counter)
    geometry.check_fits(len(image))
    header = _HDR.pack(
        IMAGE_MAGIC, 0, geometry.header_size, PROTECTED_SIZE, len(image), 0,
        version.major, version.minor, version.revision, version.build, 0,
    )  # fmt: skip
    header += bytes(geometry.header_size - HEADER_SIZE)
    protected = (
        _INFO.pack(TLV_PROT_INFO_MAGIC, PROTECTED_SIZE)
        + _TLV.pack(TLV_SEC_CNT, 4)
        + struct.pack("<I", security_counter)
    )
    payload = header + image + protected
    return UnsignedImage(payload, hashlib.sha256(payload).digest())


def key_hash(key: PublicKey) -> bytes:
    return hashlib.sha256(key.to_der()).digest()


def finish(unsigned: UnsignedImage, key: PublicKey, signature: bytes) -> bytes:
    """Append the unprotected TLVs; ``signature`` as the Signer returns it (raw r||s for P-256)."""
    sig = raw_ecdsa_to_der(signature) if key.kind == "p256" else signature
    if key.kind == "ed25519" and len(sig) != 64:
        raise CryptoError(ErrorCode.SIGNATURE, "Ed25519 signature must be 64 bytes")
    body = (
        _TLV.pack(TLV_SHA256, _DIGEST)
        + unsigned.digest
        + _TLV.pack(TLV_KEYHASH, _DIGEST)
        + key_hash(key)
        + _TLV.pack(SIG_TLV[key.kind], len(sig))
        + sig
    )
    return unsigned.payload + _INFO.pack(TLV_INFO_MAGIC, TLV_INFO_SIZE + len(body)) + body


def sign_image(
    image: bytes,
    version: ImageVersion,
    security_counter: int,
    signer: Signer,
    geometry: Geometry,
) -> bytes:
    """The signed MCUboot image of ``image``; checks bounds first, verifies the result."""
    unsigned = prepare(image, version, security_counter, geometry)
    key = signer.public_key
    signed = finish(unsigned, key, signer.sign(unsigned.message(key.kind)))
    verify_image(signed, [key])  # a signer that returned garbage never leaves here
    return signed


# --- parsing and verification ------------------------------------------------------------------


@dataclass(frozen=True)
class ParsedImage:
    header_size: int
    image_size: int
    version: ImageVersion
    security_counter: int
    hash_region: memoryview  # header + image + protected TLVs
    image: memoryview
    digest: bytes  # the SHA256 TLV (not yet checked)
    key_hash: bytes
    sig_type: int
    signature: bytes
    total_size: int

    @property
    def tlv_overhead(self) -> int:
        """Bytes MCUboot adds to the image: header, both TLV areas."""
        return self.total_size - self.image_size


@dataclass(frozen=True)
class VerifiedImage:
    parsed: ParsedImage
    key: PublicKey

    @property
    def version(self) -> ImageVersion:
        return self.parsed.version

    @property
    def security_counter(self) -> int:
        return self.parsed.security_counter

    @property
    def image_sha256(self) -> bytes:
        return hashlib.sha256(self.parsed.image).digest()


def _bad(detail: str) -> FormatError:
    return FormatError(ErrorCode.MALFORMED, f"MCUboot image: {detail}")


def _tlvs(data: memoryview, start: int, magic: int, total: int) -> list[tuple[int, bytes]]:
    """The entries of one TLV area of ``total`` bytes (info included) at ``start``."""
    if start + TLV_INFO_SIZE > len(data):
        raise _bad("TLV area missing")
    got_magic, got_total = _INFO.unpack_from(data, start)
    if got_magic != magic:
        raise _bad(f"TLV info magic {got_magic:#06x}, expected {magic:#06x}")
    if got_total != total or start + total > len(data):
        raise _bad("TLV area length does not match")
    out: list[tuple[int, bytes]] = []
    off, end = start + TLV_INFO_SIZE, start + total
    while off < end:
        if off + TLV_SIZE > end:
            raise _bad("truncated TLV")
        kind, length = _TLV.unpack_from(data, off)
        off += TLV_SIZE
        if off + length > end:
            raise _bad("TLV runs past its area")
        out.append((kind, bytes(data[off : off + length])))
        off += length
    return out


def parse_image(data: bytes | memoryview, max_size: int = MAX_MCUBOOT_IMAGE) -> ParsedImage:
    """Strict structure check of one signed image (nothing is trusted yet)."""
    if len(data) > max_size:
        raise FormatError(ErrorCode.TOO_LARGE, f"MCUboot image over {max_size} bytes")
    view = memoryview(data)
    if len(view) < HEADER_SIZE:
        raise _bad("shorter than its header")
    (magic, load, hdr_size, prot_size, img_size, flags, vmaj, vmin, vrev, vbuild, _pad) = (
        _HDR.unpack_from(view, 0)
    )
    if magic != IMAGE_MAGIC:
        raise _bad(f"magic {magic:#010x}")
    if flags != 0 or load != 0:
        raise FormatError(
            ErrorCode.UNSUPPORTED, "MCUboot image flags/load address are not supported"
        )
    if hdr_size < HEADER_SIZE or prot_size != PROTECTED_SIZE:
        raise _bad("header or protected TLV size")
    prot_start = hdr_size + img_size
    if prot_start + prot_size + TLV_INFO_SIZE > len(view):
        raise _bad("image size runs past the data")
    prot = _tlvs(view, prot_start, TLV_PROT_INFO_MAGIC, prot_size)
    if [(k, len(v)) for k, v in prot] != [(TLV_SEC_CNT, 4)]:
        raise FormatError(ErrorCode.UNSUPPORTED, "protected TLVs must be exactly SEC_CNT")
    unprot_start = prot_start + prot_size
    if unprot_start + TLV_INFO_SIZE > len(view):
        raise _bad("TLV area missing")
    (_, unprot_total) = _INFO.unpack_from(view, unprot_start)
    if unprot_start + unprot_total != len(view):
        raise _bad("bytes after the TLV area, or a short TLV area")
    tlvs = _tlvs(view, unprot_start, TLV_INFO_MAGIC, unprot_total)
    kinds = [k for k, _ in tlvs]
    if len(tlvs) != 3 or kinds[:2] != [TLV_SHA256, TLV_KEYHASH]:
        raise FormatError(
            ErrorCode.UNSUPPORTED, "TLVs must be exactly SHA256, KEYHASH, one signature"
        )
    (_, digest), (_, khash), (sig_type, sig) = tlvs
    if len(digest) != _DIGEST or len(khash) != _DIGEST:
        raise _bad("hash TLV length")
    if sig_type not in (TLV_ED25519, TLV_ECDSASIG):
        raise FormatError(ErrorCode.ALGORITHM, f"signature TLV {sig_type:#04x} is not allowed")
    return ParsedImage(
        header_size=hdr_size,
        image_size=img_size,
        version=ImageVersion(vmaj, vmin, vrev, vbuild),
        security_counter=struct.unpack("<I", prot[0][1])[0],
        hash_region=view[:unprot_start],
        image=view[hdr_size:prot_start],
        digest=digest,
        key_hash=khash,
        sig_type=sig_type,
        signature=sig,
        total_size=len(view),
    )


def verify_image(
    data: bytes | memoryview, keys: Sequence[PublicKey], max_size: int = MAX_MCUBOOT_IMAGE
) -> VerifiedImage:
    """Parse, then check the digest (E_DIGEST), the key hash against ``keys``
    (E_UNTRUSTED_KEY), the signature type (E_ALGORITHM) and the signature (E_SIGNATURE)."""
    p = parse_image(data, max_size)
    if hashlib.sha256(p.hash_region).digest() != p.digest:
        raise CryptoError(ErrorCode.DIGEST, "MCUboot image hash does not match its contents")
    key = next((k for k in keys if key_hash(k) == p.key_hash), None)
    if key is None:
        raise OtaError(ErrorCode.UNTRUSTED_KEY, "MCUboot image signed by a key not trusted here")
    if SIG_TLV[key.kind] != p.sig_type:
        raise CryptoError(ErrorCode.ALGORITHM, "signature TLV type does not match the key")
    if key.kind == "ed25519":
        key.verify(CoseAlg.ED25519, p.signature, p.digest)
    else:
        if len(p.signature) > MAX_ECDSA_DER:
            raise CryptoError(ErrorCode.SIGNATURE, "ECDSA signature too long")
        try:
            raw = der_ecdsa_to_raw(p.signature)
        except OverflowError:  # an integer wider than the curve
            raise CryptoError(ErrorCode.SIGNATURE, "ECDSA signature out of range") from None
        if raw_ecdsa_to_der(raw) != p.signature:  # one encoding only: no malleable variants
            raise CryptoError(ErrorCode.SIGNATURE, "ECDSA signature is not canonical DER")
        pub = key.crypto_key
        assert isinstance(pub, ec.EllipticCurvePublicKey)
        try:  # the digest was just checked against the hash region: do not hash it twice
            pub.verify(raw_ecdsa_to_der(raw), p.digest, _ECDSA_PREHASHED)
        except InvalidSignature:
            raise CryptoError(ErrorCode.SIGNATURE, "ECDSA signature does not verify") from None
    return VerifiedImage(p, key)
