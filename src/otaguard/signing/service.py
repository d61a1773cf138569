"""The signing service: policy check → manifest → HSM signature → self-check → audit record.

Used in-process by ``otaguard release create`` and behind HTTP by ``otaguard signing serve``
(:mod:`.http`). One request at a time: the state transaction (SQLite ``BEGIN IMMEDIATE``) and
the audit file lock serialize signers across threads and processes, so sequence numbers and the
per-model version/counter floors can never be raced.

Nothing leaves :meth:`SigningService.sign_release` unless (1) the policy allowed it, (2) the
envelope verifies with the signer's public key and says exactly what was requested, and (3) the
audit record is on disk (fsync). If the process dies after the audit append but before the
state commit, :func:`reconcile` replays the record into the state on the next start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..crypto.algorithms import HashAlg
from ..crypto.cose import Signer
from ..errors import ErrorCode, OtaError, PolicyError
from ..manifest.build import build_envelope
from ..manifest.model import ManifestInfo
from ..manifest.verify import verify_envelope
from ..mcuboot.image import Geometry
from ..trust.model import StaticKeys
from .audit import AuditHead, AuditLog, read_records, verify_log
from .mcuboot import SignedMcuboot, sign_mcuboot_locked
from .policy import Policy, Requester, SigningRequest, check_request, check_sequence
from .state import SigningState, StateTxn

log = logging.getLogger("otaguard.signing")

OP_SIGN = "sign-manifest"
OP_REFUSED = "sign-refused"


@dataclass(frozen=True)
class SignedRelease:
    envelope: bytes
    info: ManifestInfo
    manifest_digest: bytes  # encoded SUIT_Digest the signatures cover
    key_ids: tuple[str, ...]  # hex kids of the signers
    audit: AuditHead  # the audit record of this signature

    @property
    def sequence(self) -> int:
        return self.info.sequence_number


@dataclass(frozen=True)
class SignedTufTargets:
    data: bytes  # targets.json as signed
    version: int  # = the release's sequence number
    audit: AuditHead


def manifest_info(req: SigningRequest, sequence: int) -> ManifestInfo:
    text = {"model": req.model, "hw_rev": req.hw_rev, "vendor_domain": req.vendor}
    if req.description:
        text["description"] = req.description
    return ManifestInfo(
        sequence_number=sequence,
        vendor_id=req.vendor_id,
        class_id=req.class_id,
        digest_alg=HashAlg(req.digest_alg),
        image_digest=req.image_digest,
        image_size=req.image_size,
        version=req.version,
        min_version=req.min_version,
        security_counter=req.security_counter,
        expires=req.expires,
        uri=req.uri,
        text=text,
        delta=req.delta,
    )


RELEASE_FIELDS = (
    "image_digest", "digest_alg", "image_size", "vendor", "model", "hw_rev", "version",
    "min_version", "security_counter", "expires", "uri", "description",
)  # fmt: skip


def fields_json(fields: dict[str, Any]) -> str:
    """Canonical JSON of a release's identifying fields (compared for delta requests)."""
    return json.dumps(
        {k: fields.get(k) for k in RELEASE_FIELDS}, sort_keys=True, separators=(",", ":")
    )


def _alg_name(alg: HashAlg) -> str:
    return "sha256" if alg == HashAlg.SHA256 else "sha384"


def sign_subject(
    req: SigningRequest,
    info: ManifestInfo,
    requester: Requester,
    key_ids: Sequence[str],
    manifest_digest: bytes,
    envelope: bytes,
) -> dict[str, Any]:
    """The subject of a ``sign-manifest`` audit record (what :func:`reconcile` replays)."""
    delta = req.delta
    return {
        "class_id": str(req.class_id),
        "vendor_id": str(info.vendor_id),
        "vendor": req.vendor,
        "model": req.model,
        "hw_rev": req.hw_rev,
        "version": req.version,
        "min_version": req.min_version,
        "security_counter": req.security_counter,
        "sequence": info.sequence_number,
        "expires": req.expires,
        "uri": req.uri,
        "description": req.description,
        "digest_alg": _alg_name(info.digest_alg),
        "image_digest": req.image_digest.hex(),
        "image_size": req.image_size,
        "downgrade": req.downgrade,
        "fast_forward": req.fast_forward,
        "role": requester.role.value,
        "key_ids": list(key_ids),
        "manifest_digest": manifest_digest.hex(),
        "envelope_sha256": hashlib.sha256(envelope).hexdigest(),
        "delta": None
        if delta is None
        else {
            "base_digest": delta.base_digest.hex(),
            "patch_digest": delta.patch_digest.hex(),
            "patch_size": delta.patch_size,
            "patch_uri": delta.patch_uri,
        },
    }


def reconcile(state: SigningState, audit: AuditLog) -> None:
    """Check the audit log against the state's anchor, then replay records the state missed.

    The anchor check is what detects a log truncated back to an earlier seal (E_AUDIT_SEAL) or
    swapped for another log (E_AUDIT_CHAIN): the state remembers the last record it saw.
    """
    with state.transaction() as tx:
        anchor = tx.anchor()
        verify_log(audit.path, audit.trusted, allow_unsealed_tail=True, expect_head=anchor)
        start = -1 if anchor is None else anchor.seq
        last: AuditHead | None = None
        for rec in read_records(audit.path):
            last = AuditHead(rec.seq, rec.hash)
            if rec.seq <= start or rec.op != OP_SIGN:
                continue
            s = rec.subject
            log.warning("signing state missed audit record %d; replaying it", rec.seq)
            if s.get("delta") is not None:
                continue  # a delta manifest changes no floor and reuses its release's sequence
            tx.record_image(
                s["class_id"], s["version"], s["image_digest"], s["sequence"], fields_json(s)
            )
            prev = tx.last_release(s["class_id"])
            if prev is None or prev.sequence < s["sequence"]:
                tx.record_release(
                    s["class_id"],
                    s["vendor"],
                    s["model"],
                    s["hw_rev"],
                    s["version"],
                    s["security_counter"],
                    s["sequence"],
                    rec.time,
                )
            tx.observe_sequence(s["sequence"])
        if last is not None:
            tx.set_anchor(last)


def _delta_sequence(tx: StateTxn, req: SigningRequest, class_hex: str) -> int:
    """The sequence number of the full release this delta belongs to; E_POLICY if none."""
    found = tx.signed_image(class_hex, req.version, req.image_digest.hex())
    if found is None:
        raise PolicyError(
            ErrorCode.POLICY,
            f"no full release {req.version} with this image was signed for {req.model}/"
            f"{req.hw_rev}: sign the full release before its deltas",
        )
    sequence, fields = found
    if fields != fields_json(req.release_fields()):
        raise PolicyError(
            ErrorCode.POLICY,
            "a delta manifest must say exactly what its signed full release says "
            "(version, counter, expiry, uri, digest, size, description)",
        )
    return sequence


class SigningService:
    def __init__(
        self,
        signer: Signer | Sequence[Signer],
        policy: Policy,
        audit_log: AuditLog,
        state: SigningState,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        # Several signers = one release carries one signature per key (k-of-n on the
        # device); the first also seals the audit log and answers /v1/public-key.
        self.signers: tuple[Signer, ...] = (
            tuple(signer) if isinstance(signer, Sequence) else (signer,)
        )
        if not self.signers:
            raise OtaError(ErrorCode.USAGE, "the signing service needs a signer")
        kids = [s.public_key.key_id for s in self.signers]
        if len(set(kids)) != len(kids):
            raise OtaError(ErrorCode.DUPLICATE_SIGNER, "the same key is given twice as a signer")
        self.signer = self.signers[0]
        self.policy = policy
        self.audit = audit_log
        self.state = state
        self._clock = clock
        self._lock = threading.Lock()
        reconcile(state, audit_log)

    def sign_release(self, request: SigningRequest, requester: Requester | None) -> SignedRelease:
        """Sign ``request`` for ``requester`` or raise PolicyError/OtaError with its code."""
        with self._lock:
            try:
                return self._sign(request, requester)
            except PolicyError as err:
                if requester is not None and err.code != ErrorCode.AUTH:
                    self._record_refusal(request, requester, err)
                raise

    def sign_mcuboot(
        self,
        request: SigningRequest,
        requester: Requester | None,
        image: bytes,
        geometry: Geometry,
    ) -> SignedMcuboot:
        """Sign ``image`` as an MCUboot image of the already-signed release ``request``
        (:mod:`.mcuboot`): same policy, floors and audit log; refusals are audited too."""
        with self._lock:
            try:
                return sign_mcuboot_locked(
                    self, request, requester, image, geometry, int(self._clock())
                )
            except PolicyError as err:
                if requester is not None and err.code != ErrorCode.AUTH:
                    self._record_refusal(request, requester, err)
                raise

    def sign_tuf_targets(
        self, request: SigningRequest, requester: Requester | None, previous: bytes | None = None
    ) -> SignedTufTargets:
        """TUF targets metadata for a release this service signed (:mod:`.tuf_targets`):
        same policy check, same keys, one ``sign-tuf-targets`` audit record."""
        with self._lock:
            try:
                return self._sign_tuf(request, requester, previous)
            except PolicyError as err:
                if requester is not None and err.code != ErrorCode.AUTH:
                    self._record_refusal(request, requester, err)
                raise

    def record_event(self, actor: str, op: str, subject: dict[str, Any]) -> AuditHead:
        """Audit a key-management operation (authorize-key, revoke, keylist-update, ...)."""
        with self._lock, self.state.transaction() as tx:
            head = self.audit.append(actor, op, subject)
            tx.set_anchor(self.audit.head)  # a seal may have followed the record
            return head

    def close(self) -> None:
        """Seal the audit log (a closed log must end with a seal) and record the anchor."""
        with self._lock:
            self.audit.close()
            with self.state.transaction() as tx:
                # close() sealed under our lock; the log's head is now the final seal.
                tx.set_anchor(self.audit.head)

    # --- internals ---------------------------------------------------------------------------
    def _sign(self, req: SigningRequest, requester: Requester | None) -> SignedRelease:
        now = int(self._clock())
        req.validate()
        with self.state.transaction() as tx:
            class_hex = str(req.class_id)
            delta = req.delta
            if delta is None:
                check_request(self.policy, req, requester, tx.last_release(class_hex), now)
                check_sequence(self.policy, tx.last_sequence(), now, req.fast_forward)
                sequence = tx.next_sequence(now)
            else:
                # Not a new release: another encoding of one already signed, so no floor
                # moves and the sequence number is that release's (docs/delta.md).
                check_request(self.policy, req, requester, None, now)
                sequence = _delta_sequence(tx, req, class_hex)
            assert requester is not None
            info = manifest_info(req, sequence)
            envelope = build_envelope(info, self.signers)
            verified = self._self_check(envelope, info, now)
            key_ids = tuple(s.public_key.key_id.hex() for s in self.signers)
            subject = sign_subject(req, info, requester, key_ids, verified, envelope)
            head = self.audit.append(requester.id, OP_SIGN, subject)
            if delta is None:
                tx.record_release(
                    class_hex, req.vendor, req.model, req.hw_rev, req.version,
                    req.security_counter, sequence, now,
                )  # fmt: skip
                tx.record_image(
                    class_hex, req.version, req.image_digest.hex(), sequence,
                    fields_json(req.release_fields()),
                )  # fmt: skip
            tx.set_anchor(self.audit.head)
        log.info("signed %s %s seq %d for %s", req.model, req.version, sequence, requester.id)
        return SignedRelease(envelope, info, verified, key_ids, head)

    def _sign_tuf(
        self, req: SigningRequest, requester: Requester | None, previous: bytes | None
    ) -> SignedTufTargets:
        from . import tuf_targets as tt

        now = int(self._clock())
        req.validate()
        if requester is None or not requester.id:
            raise PolicyError(ErrorCode.AUTH, "no authenticated requester")
        with self.state.transaction() as tx:
            found = tx.signed_image(str(req.class_id), req.version, req.image_digest.hex())
            plan = tt.plan(req, found, previous)
            check_request(self.policy, plan.request, requester, None, now)
            data = tt.sign(plan, self.signers)
            key_ids = tuple(s.public_key.key_id.hex() for s in self.signers)
            subject = tt.audit_subject(plan, requester.role.value, key_ids, data)
            head = self.audit.append(requester.id, tt.OP_SIGN_TUF, subject)
            tx.set_anchor(self.audit.head)
        log.info("signed TUF targets v%d for %s", plan.sequence, requester.id)
        return SignedTufTargets(data, plan.sequence, head)

    def _self_check(self, envelope: bytes, info: ManifestInfo, now: int) -> bytes:
        """Verify what we are about to hand out, with the signers' own public keys: every
        one of them must have signed (threshold = number of signers)."""
        keys = [s.public_key for s in self.signers]
        try:
            vm = verify_envelope(envelope, StaticKeys(keys, len(keys)), now=now)
        except OtaError as err:
            raise OtaError(
                ErrorCode.INTERNAL, f"self-check of the new envelope failed: {err}"
            ) from None
        if vm.info != info:
            raise OtaError(ErrorCode.INTERNAL, "self-check: envelope does not say what was asked")
        return vm.manifest_digest

    def _record_refusal(self, req: SigningRequest, requester: Requester, err: OtaError) -> None:
        try:
            with self.state.transaction() as tx:
                head = self.audit.append(
                    requester.id,
                    OP_REFUSED,
                    {
                        "error": err.code.value,
                        "detail": err.detail,
                        "role": requester.role.value,
                        "model": req.model,
                        "hw_rev": req.hw_rev,
                        "vendor": req.vendor,
                        "version": req.version,
                        "security_counter": req.security_counter,
                        "image_digest": req.image_digest.hex(),
                        "downgrade": req.downgrade,
                        "delta_base_digest": (
                            req.delta_base_digest.hex() if req.delta_base_digest else None
                        ),
                    },
                )
                tx.set_anchor(self.audit.head)
                log.info("refused request audited as record %d", head.seq)
        except OtaError as exc:  # the refusal stands even if it cannot be logged
            log.error("could not audit a refused request: %s", exc)
