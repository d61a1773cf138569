"""MCUboot images signed by the signing service: the same request, policy, floors and audit log.

An MCUboot image is another encoding of a release the service already signed as SUIT (like a
delta manifest, docs/delta.md): the service signs it only for a release it signed with exactly
these fields, so it moves no floor and needs no second policy. The request still goes through
:func:`~.policy.check_request` first — against the class's last release when no such release
exists — so a request under a floor is refused with the floor's own code (E_SECURITY_COUNTER,
E_DOWNGRADE) and only then with E_POLICY ("sign the release first"). Every image gets its own
``sign-mcuboot`` audit record.

Unlike a SUIT manifest, the MCUboot hash covers the header and the whole image, so the service
is given the image bytes (bounded by :data:`~otaguard.mcuboot.image.MAX_MCUBOOT_IMAGE` and the
slot) and checks they are the bytes the request names before anything else.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..crypto.algorithms import HashAlg, digest_bytes
from ..errors import CryptoError, ErrorCode, FormatError, PolicyError
from ..mcuboot.image import (
    DEFAULT_TRAILER,
    HEADER_SIZE,
    Geometry,
    ImageVersion,
    VerifiedImage,
    sign_image,
    verify_image,
)
from .audit import AuditHead
from .policy import Requester, SigningRequest, check_request

if TYPE_CHECKING:
    from .service import SigningService

OP_SIGN_MCUBOOT = "sign-mcuboot"


@dataclass(frozen=True)
class SignedMcuboot:
    image: bytes  # the complete signed MCUboot image
    verified: VerifiedImage
    sequence: int  # the SUIT release's sequence number
    key_id: str  # hex kid of the signer
    audit: AuditHead


def check_mcuboot_input(req: SigningRequest, image: bytes, geometry: Geometry) -> ImageVersion:
    """Everything that can be refused before policy and key: request shape, that ``image`` is
    what the request names, that the version/counter fit and the image fits the slot."""
    req.validate()
    if req.delta is not None:
        raise FormatError(ErrorCode.MALFORMED, "an MCUboot image is signed for a full release")
    if len(image) != req.image_size or digest_bytes(image, req.digest_alg) != req.image_digest:
        raise CryptoError(ErrorCode.DIGEST, "the image is not the one the request names")
    version = ImageVersion.from_release(req.version)
    if req.security_counter > 0xFFFF_FFFF:
        raise FormatError(
            ErrorCode.FIELD_RANGE,
            f"security counter {req.security_counter} does not fit MCUboot's SEC_CNT (u32)",
        )
    geometry.check_fits(len(image))
    return version


def mcuboot_subject(
    req: SigningRequest,
    requester: Requester,
    sequence: int,
    key_id: str,
    signed: bytes,
    verified: VerifiedImage,
    geometry: Geometry,
) -> dict[str, Any]:
    return {
        "class_id": str(req.class_id),
        "vendor": req.vendor,
        "model": req.model,
        "hw_rev": req.hw_rev,
        "version": req.version,
        "mcuboot_version": str(verified.version),
        "security_counter": req.security_counter,
        "sequence": sequence,
        "digest_alg": "sha256" if req.digest_alg == HashAlg.SHA256 else "sha384",
        "image_digest": req.image_digest.hex(),
        "image_size": req.image_size,
        "role": requester.role.value,
        "key_id": key_id,
        "mcuboot_sha256": hashlib.sha256(signed).hexdigest(),
        "mcuboot_size": len(signed),
        "header_size": geometry.header_size,
        "slot_size": geometry.slot_size,
    }


def sign_mcuboot_locked(
    svc: SigningService,
    req: SigningRequest,
    requester: Requester | None,
    image: bytes,
    geometry: Geometry,
    now: int,
) -> SignedMcuboot:
    """The service's MCUboot path; the caller holds the service lock."""
    from .service import fields_json

    version = check_mcuboot_input(req, image, geometry)
    with svc.state.transaction() as tx:
        class_hex = str(req.class_id)
        found = tx.signed_image(class_hex, req.version, req.image_digest.hex())
        if found is None or found[1] != fields_json(req.release_fields()):
            check_request(svc.policy, req, requester, tx.last_release(class_hex), now)
            raise PolicyError(
                ErrorCode.POLICY,
                f"no release {req.version} of {req.model}/{req.hw_rev} with exactly these "
                "fields was signed: sign the release (SUIT) before its MCUboot image",
            )
        check_request(svc.policy, req, requester, None, now)
        assert requester is not None
        sequence = found[0]
        signer = svc.signer  # MCUboot checks one signature: the first signer's
        signed = sign_image(image, version, req.security_counter, signer, geometry)
        verified = verify_image(signed, [signer.public_key])
        key_id = signer.public_key.key_id.hex()
        subject = mcuboot_subject(req, requester, sequence, key_id, signed, verified, geometry)
        head = svc.audit.append(requester.id, OP_SIGN_MCUBOOT, subject)
        tx.set_anchor(svc.audit.head)
    return SignedMcuboot(signed, verified, sequence, key_id, head)


# --- wire form (POST /v1/sign-mcuboot) -----------------------------------------------------------

MCUBOOT_BODY_FIELDS = frozenset({"request", "image", "header_size", "slot_size", "trailer_size"})


def mcuboot_body(req: SigningRequest, image: bytes, geometry: Geometry) -> dict[str, Any]:
    return {
        "request": req.to_dict(),
        "image": base64.b64encode(image).decode(),
        "header_size": geometry.header_size,
        "slot_size": geometry.slot_size,
        "trailer_size": geometry.trailer_size,
    }


def _int_field(d: dict[str, Any], name: str, *, optional: bool = False) -> int | None:
    v = d.get(name)
    if v is None and optional:
        return None
    if type(v) is not int or v < 0:
        raise FormatError(ErrorCode.MALFORMED, f"{name} must be a non-negative integer")
    return v


def parse_mcuboot_body(obj: object) -> tuple[SigningRequest, bytes, Geometry]:
    """The service's side of :func:`mcuboot_body`; E_MALFORMED names the bad field."""
    if not isinstance(obj, dict):
        raise FormatError(ErrorCode.MALFORMED, "body must be a JSON object")
    unknown = set(obj) - MCUBOOT_BODY_FIELDS
    if unknown or "request" not in obj or "image" not in obj:
        raise FormatError(
            ErrorCode.MALFORMED, f"want fields {sorted(MCUBOOT_BODY_FIELDS)} (request, image)"
        )
    req = SigningRequest.from_dict(obj["request"])
    text = obj["image"]
    if not isinstance(text, str):
        raise FormatError(ErrorCode.MALFORMED, "image must be base64 text")
    try:
        image = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(ErrorCode.MALFORMED, "image is not base64") from None
    header = _int_field(obj, "header_size", optional=True)
    trailer = _int_field(obj, "trailer_size", optional=True)
    geometry = Geometry(
        _int_field(obj, "slot_size", optional=True),
        HEADER_SIZE if header is None else header,
        DEFAULT_TRAILER if trailer is None else trailer,
    )
    geometry.check()
    return req, image, geometry


def mcuboot_answer(s: SignedMcuboot) -> dict[str, Any]:
    """The answer: only the TLV area the service appended (the caller holds the rest)."""
    return {
        "tlvs": base64.b64encode(s.image[len(s.verified.parsed.hash_region) :]).decode(),
        "mcuboot_size": len(s.image),
        "mcuboot_sha256": hashlib.sha256(s.image).hexdigest(),
        "version": str(s.verified.version),
        "security_counter": s.verified.security_counter,
        "sequence": s.sequence,
        "key_id": s.key_id,
        "audit": {"seq": s.audit.seq, "hash": s.audit.hash},
    }
