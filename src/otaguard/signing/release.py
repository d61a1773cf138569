"""A release directory: ``manifest.suit`` + ``image.bin`` + ``release.json``, written atomically.

With an MCUboot job (``release create --format mcuboot``) it also holds ``image.mcuboot.bin``
(:mod:`.release_mcuboot`). With ``delta_from`` it also holds, per published delta,
``patch-<base>.ogdp`` and its own signed ``manifest-delta-<base>.suit`` (``<base>`` = first 16
hex digits of the base image digest): the same release (version, counters, sequence number,
final digest and size) plus the delta part (:mod:`.release_deltas` decides which deltas are
worth publishing).

The directory is assembled under a temporary name next to the destination and renamed into
place only when complete, so a crash or a refused signature never leaves a half-written
release. The image is hashed while it is copied into the temporary directory and it is *that*
digest which is signed, so a build output that changes under our feet cannot end up with a
manifest for different bytes than the ones shipped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..crypto.algorithms import HashAlg, StreamingHasher
from ..crypto.keys import PublicKey
from ..errors import ErrorCode, OtaError, UsageError
from ..fsutil import read_limited
from ..manifest.verify import VerifiedManifest, verify_envelope
from ..trust.model import StaticKeys
from .audit import AuditHead
from .policy import SigningRequest
from .release_deltas import (
    DEFAULT_DELTA_FACTOR,
    MAX_DELTA_IMAGE,
    BaseRelease,
    check_same_class,
    load_base,
    patch_digest,
    plan_delta,
    plan_summary,
    xz_size,
)
from .release_mcuboot import McubootJob
from .release_mcuboot import finish as finish_mcuboot
from .release_mcuboot import prepare as prepare_mcuboot

MANIFEST_FILE = "manifest.suit"
IMAGE_FILE = "image.bin"
SUMMARY_FILE = "release.json"
RELEASE_FORMAT = 1
_CHUNK = 1 << 20
_REL = re.compile(r"^\+(\d{1,5})([dhm])$")


def parse_expires(text: str | None, now: int) -> int | None:
    """``+30d`` / ``+12h`` / ``+90m``, an ISO date (end of that day, UTC) or ISO datetime."""
    if text is None or text == "":
        return None
    m = _REL.match(text.strip())
    if m:
        n, unit = int(m.group(1)), m.group(2)
        return now + n * {"d": 86400, "h": 3600, "m": 60}[unit]
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text.strip()):
            d = dt.date.fromisoformat(text.strip())
            end = dt.datetime.combine(d, dt.time(23, 59, 59), tzinfo=dt.UTC)
            return int(end.timestamp())
        t = dt.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise UsageError(
            ErrorCode.USAGE, f"--expires {text!r}: want +30d, +12h, YYYY-MM-DD or ISO datetime"
        ) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return int(t.timestamp())


def copy_and_hash(src: Path, dst: Path, alg: HashAlg) -> tuple[bytes, int]:
    h = StreamingHasher(alg)
    try:
        with src.open("rb") as fi, dst.open("xb") as fo:
            while chunk := fi.read(_CHUNK):
                h.update(chunk)
                fo.write(chunk)
            fo.flush()
            os.fsync(fo.fileno())
    except FileNotFoundError:
        raise OtaError(ErrorCode.NOT_FOUND, f"{src} does not exist") from None
    except IsADirectoryError:
        raise UsageError(ErrorCode.USAGE, f"{src} is a directory") from None
    return h.digest(), h.length


def check_envelope(
    envelope: bytes,
    keys: Sequence[PublicKey],
    req: SigningRequest,
    now: int,
    min_signers: int = 1,
) -> VerifiedManifest:
    """Verify a freshly signed envelope (``min_signers`` distinct keys of ``keys``) and that it
    says exactly what was requested."""
    vm = verify_envelope(envelope, StaticKeys(list(keys), min_signers), now=now)
    info = vm.info
    expected = {
        "vendor_id": req.vendor_id,
        "class_id": req.class_id,
        "digest_alg": req.digest_alg,
        "image_digest": req.image_digest,
        "image_size": req.image_size,
        "version": req.version,
        "min_version": req.min_version,
        "security_counter": req.security_counter,
        "expires": req.expires,
        "uri": req.uri,
        "delta": req.delta,
    }
    for name, want in expected.items():
        if getattr(info, name) != want:
            raise OtaError(
                ErrorCode.INTERNAL, f"signed manifest differs from the request in {name}"
            )
    return vm


@dataclass(frozen=True)
class ReleaseResult:
    out: Path
    summary: dict[str, Any]


def _write_file(path: Path, data: bytes) -> None:
    with path.open("xb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


SignOne = Callable[[SigningRequest], tuple[bytes, AuditHead]]
SignBatch = Callable[[Sequence[SigningRequest]], Sequence[tuple[bytes, AuditHead]]]


def build_release(
    out: Path,
    image: Path,
    digest_alg: HashAlg,
    make_request: Callable[[bytes, int], SigningRequest],
    sign: SignOne | None,
    verify_keys: Callable[[], Sequence[PublicKey]],
    now: int,
    *,
    signed_by: str | Callable[[], str],
    delta_from: Sequence[Path] = (),
    delta_factor: float = DEFAULT_DELTA_FACTOR,
    patch_uri_prefix: str | None = None,
    sign_batch: SignBatch | None = None,
    min_signers: int | Callable[[], int] = 1,
    mcuboot: McubootJob | None = None,
) -> ReleaseResult:
    """Assemble ``out``: copy+hash image → request → plan deltas → sign → verify → summary →
    rename.

    ``make_request(digest, size)`` builds the request from the copied image's digest;
    ``sign(request)`` returns (envelope, audit anchor), called for the full release first and
    then for each delta; or ``sign_batch(requests)`` signs them all at once (a co-signing
    request: the officers approve the release and its deltas together). ``mcuboot`` adds the
    release's MCUboot image (:mod:`.release_mcuboot`), bounds checked before any signature.
    ``verify_keys()``
    gives the keys the envelopes must verify with, ``min_signers`` of them distinct.
    ``signed_by`` and ``min_signers`` may be callables, asked after signing (a co-signing
    request learns its id and threshold from the service).
    """
    out = Path(out)
    if not 0 < delta_factor <= 1:
        raise UsageError(ErrorCode.USAGE, "--delta-factor must be in (0, 1]")
    if (sign is None) == (sign_batch is None):
        raise UsageError(ErrorCode.USAGE, "give exactly one of sign and sign_batch")
    if mcuboot is not None and sign_batch is not None:
        raise UsageError(ErrorCode.USAGE, "an MCUboot image is not supported with co-signing")
    if out.exists():
        raise OtaError(ErrorCode.EXISTS, f"{out} already exists; refusing to overwrite a release")
    parent = out.parent if str(out.parent) else Path(".")
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f".{out.name}.tmp-{secrets.token_hex(6)}"
    tmp.mkdir(mode=0o755)
    try:
        digest, size = copy_and_hash(image, tmp / IMAGE_FILE, digest_alg)
        req = make_request(digest, size)
        mc_image = None if mcuboot is None else prepare_mcuboot(tmp / IMAGE_FILE, req, mcuboot)
        bases = [load_base(Path(p)) for p in delta_from]  # refuse bad bases before signing
        for b in bases:
            check_same_class(b, req)
        planned, skipped, xz = (
            _plan_deltas(tmp, bases, req, delta_factor, patch_uri_prefix) if bases else ([], [], 0)
        )
        reqs = [req, *(d.request for d in planned)]
        if sign_batch is not None:
            signed = list(sign_batch(reqs))
        else:
            assert sign is not None
            signed = [sign(r) for r in reqs]  # the full release first: deltas refer to it
        if len(signed) != len(reqs):
            raise OtaError(ErrorCode.INTERNAL, "signer returned another number of manifests")
        (envelope, audit), delta_signed = signed[0], signed[1:]
        if callable(min_signers):
            min_signers = min_signers()
        if callable(signed_by):
            signed_by = signed_by()
        keys = verify_keys()
        vm = check_envelope(envelope, keys, req, now, min_signers)
        _write_file(tmp / MANIFEST_FILE, envelope)
        info = vm.info
        summary: dict[str, Any] = {
            "format": RELEASE_FORMAT,
            "vendor": req.vendor,
            "vendor_id": str(info.vendor_id),
            "model": req.model,
            "hw_rev": req.hw_rev,
            "class_id": str(info.class_id),
            "version": info.version,
            "min_version": info.min_version,
            "security_counter": info.security_counter,
            "sequence": info.sequence_number,
            "expires": info.expires,
            "expires_iso": (
                dt.datetime.fromtimestamp(info.expires, dt.UTC).isoformat()
                if info.expires is not None
                else None
            ),
            "uri": info.uri,
            "image": {
                "file": IMAGE_FILE,
                "size": size,
                "digest_alg": "sha256" if info.digest_alg == HashAlg.SHA256 else "sha384",
                "digest": digest.hex(),
            },
            "manifest": {
                "file": MANIFEST_FILE,
                "size": len(envelope),
                "suit_digest": vm.manifest_digest.hex(),
                "sha256": hashlib.sha256(envelope).hexdigest(),
            },
            "signer_key_ids": [s.key_id.hex() for s in vm.signers],
            "signed_by": signed_by,
            "audit": {"seq": audit.seq, "hash": audit.hash},
            "downgrade": req.downgrade,
            "fast_forward": req.fast_forward,
        }
        if mcuboot is not None:
            assert mc_image is not None
            summary["mcuboot"] = finish_mcuboot(tmp, mcuboot, req, mc_image, info, keys)
        if bases:
            published = [
                _write_delta(tmp, d, env, aud, vm, keys, now, min_signers)
                for d, (env, aud) in zip(planned, delta_signed, strict=True)
            ]
            summary.update(
                {
                    "deltas": published,
                    "deltas_skipped": skipped,
                    "delta_rule": {
                        "factor": delta_factor,
                        "xz_preset": "9e",
                        "xz_size": xz,
                    },
                }
            )
        _write_file(
            tmp / SUMMARY_FILE, json.dumps(summary, indent=2, sort_keys=True).encode() + b"\n"
        )
        _fsync_dir(tmp)
        if out.exists():
            raise OtaError(ErrorCode.EXISTS, f"{out} appeared meanwhile; refusing to overwrite")
        os.rename(tmp, out)
        _fsync_dir(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ReleaseResult(out, summary)


@dataclass(frozen=True)
class _PlannedDelta:
    request: SigningRequest
    patch: bytes
    patch_name: str
    manifest_name: str
    entry: dict[str, Any]


def _plan_deltas(
    tmp: Path,
    bases: Sequence[BaseRelease],
    req: SigningRequest,
    factor: float,
    patch_uri_prefix: str | None,
) -> tuple[list[_PlannedDelta], list[dict[str, Any]], int]:
    """Create and judge the deltas; the requests of the published ones and the skipped ones."""
    new_image = read_limited(tmp / IMAGE_FILE, MAX_DELTA_IMAGE)
    xz = xz_size(tmp / IMAGE_FILE)
    planned: list[_PlannedDelta] = []
    skipped: list[dict[str, Any]] = []
    seen: set[bytes] = set()
    for base in bases:
        plan = plan_delta(base, new_image, req, xz, factor)
        entry = plan_summary(plan, len(new_image), xz)
        if base.digest in seen:
            skipped.append({**entry, "reason": "duplicate base"})
            continue
        seen.add(base.digest)
        if not plan.published:
            skipped.append(entry)
            continue
        stem = plan.file_stem()
        patch_name, manifest_name = f"patch-{stem}.ogdp", f"manifest-delta-{stem}.suit"
        pdig = patch_digest(plan.patch, req.digest_alg)
        dreq = dataclasses.replace(
            req,
            delta_base_digest=base.digest,
            delta_patch_digest=pdig,
            delta_patch_size=len(plan.patch),
            delta_patch_uri=patch_uri_prefix + patch_name if patch_uri_prefix else None,
        )
        dreq.validate()
        planned.append(_PlannedDelta(dreq, plan.patch, patch_name, manifest_name, entry))
    return planned, skipped, xz


def _write_delta(
    tmp: Path,
    d: _PlannedDelta,
    envelope: bytes,
    audit: AuditHead,
    full: VerifiedManifest,
    keys: Sequence[PublicKey],
    now: int,
    min_signers: int,
) -> dict[str, Any]:
    """Check one signed delta manifest, write it with its patch; its summary entry."""
    dreq = d.request
    vm = check_envelope(envelope, keys, dreq, now, min_signers)
    if vm.info.sequence_number != full.info.sequence_number:
        raise OtaError(
            ErrorCode.INTERNAL, "delta manifest got another sequence number than its release"
        )
    _write_file(tmp / d.patch_name, d.patch)
    _write_file(tmp / d.manifest_name, envelope)
    assert dreq.delta_patch_digest is not None
    return {
        **d.entry,
        "patch": d.patch_name,
        "patch_digest": dreq.delta_patch_digest.hex(),
        "patch_uri": dreq.delta_patch_uri,
        "manifest": {
            "file": d.manifest_name,
            "size": len(envelope),
            "suit_digest": vm.manifest_digest.hex(),
            "sha256": hashlib.sha256(envelope).hexdigest(),
        },
        "signer_key_ids": [s.key_id.hex() for s in vm.signers],
        "audit": {"seq": audit.seq, "hash": audit.hash},
    }
