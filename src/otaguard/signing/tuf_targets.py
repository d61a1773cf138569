"""TUF targets metadata for a release the service already signed as SUIT.

Not a second policy path: like a delta manifest (docs/delta.md) the targets document is another
encoding of a release that is already signed, so it gets that release's sequence number (which
is also the targets version: monotonic across releases, no extra counter), moves no floor, and
is checked by the same :func:`~.policy.check_request` with the fields the service recorded when
it signed the release (counter, expiry, URI), so a policy tightened since then applies too.
One audit record per signature (``sign-tuf-targets``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tuf.api.metadata import Metadata, Targets

from ..crypto.algorithms import HashAlg
from ..crypto.cose import Signer
from ..errors import ErrorCode, OtaError, PolicyError
from ..tufrepo import metadata as tm
from ..tufrepo.signer import TufSigner
from .policy import SigningRequest

OP_SIGN_TUF = "sign-tuf-targets"


@dataclass(frozen=True)
class TufTargetsPlan:
    """What will be signed, decided before any key is touched."""

    request: SigningRequest  # with the recorded fields of the signed release
    sequence: int
    metadata: Metadata[Targets]


def plan(
    req: SigningRequest, found: tuple[int, str] | None, previous: bytes | None
) -> TufTargetsPlan:
    """Match ``req`` to the signed release (``found`` = its sequence and recorded fields) and
    build the unsigned targets metadata; E_POLICY / E_UNSUPPORTED / E_MALFORMED / E_REPLAY."""
    if req.digest_alg != HashAlg.SHA256:
        raise OtaError(ErrorCode.UNSUPPORTED, "TUF targets are published with sha256 images only")
    if req.delta is not None:
        raise OtaError(ErrorCode.USAGE, "a TUF target is a full image, not a delta")
    if found is None:
        raise PolicyError(
            ErrorCode.POLICY,
            f"no release {req.version} with this image was signed for {req.model}/{req.hw_rev}:"
            " sign the release (SUIT) before its TUF targets",
        )
    sequence, fields_text = found
    fields: dict[str, Any] = json.loads(fields_text)
    recorded = dataclasses.replace(
        req,
        min_version=fields.get("min_version"),
        security_counter=int(fields["security_counter"]),
        expires=fields.get("expires"),
        uri=fields.get("uri"),
        description=fields.get("description"),
    )
    if recorded.expires is None:
        raise PolicyError(ErrorCode.POLICY, "TUF targets need an expiry (sign with --expires)")
    prev: Metadata[Targets] | None = None
    if previous is not None:
        prev = tm.parse(previous, Targets)
        if prev.signed.version >= sequence:
            raise OtaError(
                ErrorCode.REPLAY,
                f"the previous targets (version {prev.signed.version}) are newer than this "
                f"release (sequence {sequence})",
            )
    md = tm.build_targets(
        version=sequence,
        expires=recorded.expires,
        path=tm.target_path(req.model, req.hw_rev),
        length=req.image_size,
        sha256=req.image_digest,
        custom=tm.target_custom(
            version=req.version,
            security_counter=recorded.security_counter,
            model=req.model,
            hw_rev=req.hw_rev,
            sequence=sequence,
        ),
        previous=prev,
    )
    return TufTargetsPlan(recorded, sequence, md)


def sign(p: TufTargetsPlan, signers: Sequence[Signer]) -> bytes:
    """Sign with every release key and check the result verifies with them (self-check)."""
    wrapped = [TufSigner(s) for s in signers]
    data = tm.sign(p.metadata, wrapped)
    check = tm.parse(data, Targets)
    for w in wrapped:
        key = w.public_key
        sig = check.signatures.get(key.keyid)
        try:
            assert sig is not None
            key.verify_signature(sig, check.signed_bytes)
        except Exception:
            raise OtaError(ErrorCode.INTERNAL, "self-check of the TUF targets failed") from None
    return data


def audit_subject(
    p: TufTargetsPlan, role: str, key_ids: Sequence[str], data: bytes
) -> dict[str, Any]:
    r = p.request
    return {
        "class_id": str(r.class_id),
        "vendor": r.vendor,
        "model": r.model,
        "hw_rev": r.hw_rev,
        "version": r.version,
        "security_counter": r.security_counter,
        "sequence": p.sequence,
        "expires": r.expires,
        "image_digest": r.image_digest.hex(),
        "image_size": r.image_size,
        "targets_version": p.metadata.signed.version,
        "targets_paths": sorted(p.metadata.signed.targets),
        "targets_sha256": hashlib.sha256(data).hexdigest(),
        "role": role,
        "key_ids": list(key_ids),
    }
