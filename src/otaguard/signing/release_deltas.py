"""Deltas for a release: which earlier releases get a patch, and whether it is worth publishing.

For each ``--delta-from`` directory (an earlier release: ``release.json`` + ``image.bin``) the
base image is re-hashed and must match what its ``release.json`` recorded, and must be for the
same vendor, model and hardware revision (same SUIT class) with the same digest algorithm —
the device compares the manifest's base digest with its running image's signed digest. A patch
is published only when it is clearly smaller than the full image compressed with xz
(``lzma`` preset 9 | extreme): ``len(patch) <= factor * xz(full)``, factor 0.8 by default. An
already-compressed or encrypted image gives a patch about as large as the image, and then the
delta would save nothing while adding a second way to fail: it is skipped, with the reason
recorded in ``release.json``.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..crypto.algorithms import HashAlg, StreamingHasher, hash_alg
from ..delta import apply_patch_bytes, create_patch
from ..errors import ErrorCode, FormatError, OtaError
from ..fsutil import read_limited
from ..manifest.ids import class_id, vendor_id
from .policy import SigningRequest

DEFAULT_DELTA_FACTOR = 0.8
MAX_SUMMARY = 1 << 20
MAX_DELTA_IMAGE = 256 << 20  # create_patch holds both images in memory
XZ_PRESET = 9 | lzma.PRESET_EXTREME
_CHUNK = 1 << 20


@dataclass(frozen=True)
class BaseRelease:
    """An earlier release directory, checked: its image hashes to what its summary says."""

    path: Path
    version: str
    vendor: str
    model: str
    hw_rev: str
    digest_alg: HashAlg
    digest: bytes
    image: bytes


@dataclass(frozen=True)
class DeltaPlan:
    """One base: the patch (if any) and whether it is published."""

    base: BaseRelease
    patch: bytes
    published: bool
    reason: str  # why it was skipped, or "" when published

    def file_stem(self) -> str:
        return self.base.digest.hex()[:16]


def xz_size(path: Path) -> int:
    """Size of ``path`` compressed with xz -9e (streamed, only the count is kept)."""
    comp = lzma.LZMACompressor(format=lzma.FORMAT_XZ, preset=XZ_PRESET)
    total = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            total += len(comp.compress(chunk))
    return total + len(comp.flush())


def load_base(directory: Path) -> BaseRelease:
    """Read an earlier release directory and re-check its image against its summary."""
    directory = Path(directory)
    try:
        summary = json.loads(read_limited(directory / "release.json", MAX_SUMMARY))
        img = summary["image"]
        alg = hash_alg(str(img["digest_alg"]))
        want = bytes.fromhex(str(img["digest"]))
        base = (
            str(summary["version"]),
            str(summary["vendor"]),
            str(summary["model"]),
            str(summary["hw_rev"]),
        )
        image_path = directory / str(img.get("file", "image.bin"))
    except OtaError as err:
        if err.code == ErrorCode.NOT_FOUND:
            raise OtaError(ErrorCode.NOT_FOUND, f"{directory}: no release.json") from None
        raise
    except (ValueError, KeyError, TypeError):
        raise FormatError(ErrorCode.MALFORMED, f"{directory}/release.json is malformed") from None
    if image_path.parent != directory or not image_path.is_file():
        raise OtaError(ErrorCode.NOT_FOUND, f"{directory}: release image missing")
    data = read_limited(image_path, MAX_DELTA_IMAGE)
    h = StreamingHasher(alg)
    h.update(data)
    if h.digest() != want or len(data) != int(img.get("size", len(data))):
        raise OtaError(
            ErrorCode.IMAGE_DIGEST, f"{directory}: image does not match its release.json"
        )
    return BaseRelease(directory, *base, alg, want, data)


def check_same_class(base: BaseRelease, req: SigningRequest) -> None:
    """A delta only makes sense for the same vendor/model/hw revision (same SUIT class)."""
    if vendor_id(base.vendor) != req.vendor_id:
        raise OtaError(
            ErrorCode.VENDOR_ID, f"{base.path} is for vendor {base.vendor}, not {req.vendor}"
        )
    if class_id(req.vendor_id, base.model, base.hw_rev) != req.class_id:
        raise OtaError(
            ErrorCode.CLASS_ID,
            f"{base.path} is for {base.model}/{base.hw_rev}, not {req.model}/{req.hw_rev}",
        )


def plan_delta(
    base: BaseRelease, new_image: bytes, req: SigningRequest, xz: int, factor: float
) -> DeltaPlan:
    """Make the patch and apply the publishing rule."""
    if base.digest_alg != req.digest_alg:
        return DeltaPlan(base, b"", False, "base was signed with another digest algorithm")
    if base.digest == req.image_digest:
        return DeltaPlan(base, b"", False, "base is the same image")
    patch = create_patch(base.image, new_image)
    # create_patch already proves the round trip; re-check independently before signing.
    if apply_patch_bytes(base.image, patch) != new_image:
        raise OtaError(ErrorCode.INTERNAL, "patch does not reproduce the new image")
    limit = factor * xz
    if len(patch) > limit:
        return DeltaPlan(
            base,
            patch,
            False,
            f"patch {len(patch)} B > {factor:g} x xz(full) {xz} B: not clearly smaller "
            "(compressed or encrypted image?)",
        )
    return DeltaPlan(base, patch, True, "")


def plan_summary(plan: DeltaPlan, new_size: int, xz: int) -> dict[str, Any]:
    return {
        "base_version": plan.base.version,
        "base_digest": plan.base.digest.hex(),
        "base_dir": str(plan.base.path),
        "patch_size": len(plan.patch),
        "pct_of_full": round(100 * len(plan.patch) / max(new_size, 1), 2),
        "pct_of_xz": round(100 * len(plan.patch) / max(xz, 1), 2),
        **({"reason": plan.reason} if not plan.published else {}),
    }


def patch_digest(patch: bytes, alg: HashAlg) -> bytes:
    if alg == HashAlg.SHA256:
        return hashlib.sha256(patch).digest()
    h = StreamingHasher(alg)
    h.update(patch)
    return h.digest()
