"""The MCUboot image of a release directory (``image.mcuboot.bin``, ``release.json`` "mcuboot").

:func:`~.release.build_release` calls :func:`prepare` right after the image is copied and hashed
— before anything is signed, so a version or counter that does not fit MCUboot's fields or an
image that does not fit the slot is refused with its code and no signature exists — and
:func:`finish` after the SUIT manifest is signed and checked: the MCUboot image is signed for
that release (the service requires it), verified with the release's keys and held against the
manifest (same image bytes, version and security counter) before it is written.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..crypto.algorithms import digest_bytes
from ..crypto.keys import PublicKey
from ..errors import ErrorCode, OtaError
from ..fsutil import read_limited
from ..manifest.model import ManifestInfo
from ..mcuboot.image import MAX_MCUBOOT_IMAGE, Geometry, ImageVersion, verify_image
from .audit import AuditHead
from .mcuboot import check_mcuboot_input
from .policy import SigningRequest

MCUBOOT_FILE = "image.mcuboot.bin"

SignMcuboot = Callable[[SigningRequest, bytes], tuple[bytes, AuditHead]]


@dataclass(frozen=True)
class McubootJob:
    """``release create --format mcuboot``: where the image goes and who signs it."""

    geometry: Geometry
    sign: SignMcuboot  # (request, image bytes) -> (signed MCUboot image, audit record)


def prepare(image_path: Path, req: SigningRequest, job: McubootJob) -> bytes:
    """The image bytes, once every MCUboot bound is checked (nothing signed yet)."""
    job.geometry.check_fits(req.image_size)  # before reading a file that cannot fit
    image = read_limited(image_path, MAX_MCUBOOT_IMAGE)
    check_mcuboot_input(req, image, job.geometry)
    return image


def finish(
    tmp: Path,
    job: McubootJob,
    req: SigningRequest,
    image: bytes,
    info: ManifestInfo,
    keys: Sequence[PublicKey],
) -> dict[str, Any]:
    signed, audit = job.sign(req, image)
    v = verify_image(signed, keys)
    if (
        v.version != ImageVersion.from_release(info.version)
        or v.security_counter != info.security_counter
        or digest_bytes(v.parsed.image, info.digest_alg) != info.image_digest
    ):
        raise OtaError(ErrorCode.INTERNAL, "MCUboot image differs from the signed release")
    with (tmp / MCUBOOT_FILE).open("xb") as f:
        f.write(signed)
        f.flush()
        os.fsync(f.fileno())
    return {
        "file": MCUBOOT_FILE,
        "size": len(signed),
        "sha256": hashlib.sha256(signed).hexdigest(),
        "version": str(v.version),
        "security_counter": v.security_counter,
        "header_size": job.geometry.header_size,
        "slot_size": job.geometry.slot_size,
        "trailer_size": job.geometry.trailer_size,
        "tlv_overhead": v.parsed.tlv_overhead,
        "key_id": v.key.key_id.hex(),
        "audit": {"seq": audit.seq, "hash": audit.hash},
    }
