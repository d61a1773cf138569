"""Co-signing (two-person rule): a release waits until k distinct officers have signed it.

A requester (CI or a release manager) files a *co-signing request*: the full release and its
delta manifests, checked against the policy exactly like ``POST /v1/sign`` and given their
sequence number at once, so the manifests are fixed from the start. Officers then approve it
one by one; an approval is a signature with *that officer's own* HSM key over every manifest
of the request (the key is bound to the officer's token identity in the service config), and
each approval is an audit record. When ``threshold`` distinct officers have signed, the
envelopes are assembled (one COSE_Sign1 per officer), verified, recorded in the signing state
as a signed release (``sign-manifest`` audit records, as for a single signature) and handed
to the requester.

An approval names the *request digest* it approves (SHA-256 over the encoded manifest digests
of the request), so an officer signs exactly what they reviewed: a request whose manifests
differ is ``E_REQUEST_CHANGED``. Refused: the same officer or key twice
(``E_DUPLICATE_SIGNER``), the requester approving their own request when ``four_eyes`` is on
(``E_FOUR_EYES``), a token that is not an officer (``E_FORBIDDEN``), an officer whose policy
grants do not cover the release (``E_POLICY``), a request past its deadline
(``E_REQUEST_EXPIRED``). Every refusal of an authenticated caller is audited
(``cosign-refused``).

Pending requests live in the signing state (SQLite), so they survive a restart of the service.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .. import cbor
from ..crypto.algorithms import HashAlg
from ..crypto.cose import Signer, sign1
from ..crypto.keys import PublicKey
from ..errors import ErrorCode, FormatError, OtaError, PolicyError
from ..manifest.build import assemble_envelope, manifest_digest
from ..manifest.envelope import MAX_AUTH_BLOCKS
from ..manifest.model import ManifestInfo
from ..manifest.profile import encode_manifest
from ..manifest.verify import verify_envelope
from ..trust.model import StaticKeys
from .policy import (
    SIGNING_ROLES,
    Requester,
    Role,
    SigningRequest,
    check_request,
    check_sequence,
)
from .service import (
    OP_SIGN,
    SigningService,
    _delta_sequence,
    fields_json,
    manifest_info,
    sign_subject,
)
from .state import StateTxn

log = logging.getLogger("otaguard.signing.cosign")

OP_REQUEST = "cosign-request"
OP_APPROVE = "cosign-approve"
OP_COSIGN_REFUSED = "cosign-refused"
MAX_MANIFESTS = 17  # the release and up to 16 deltas
DEFAULT_TTL = 24 * 3600
MAX_TTL = 30 * 86400

PENDING, COMPLETE, EXPIRED, FAILED = "pending", "complete", "expired", "failed"


@dataclass(frozen=True)
class CosignConfig:
    """``threshold`` distinct officers must sign; a request lapses ``ttl`` seconds after it
    was filed; ``four_eyes``: its requester may not be one of its approvers."""

    threshold: int
    ttl: int = DEFAULT_TTL
    four_eyes: bool = True

    def __post_init__(self) -> None:
        if not 1 <= self.threshold <= MAX_AUTH_BLOCKS or not 60 <= self.ttl <= MAX_TTL:
            raise FormatError(
                ErrorCode.MALFORMED,
                f"cosign: threshold 1..{MAX_AUTH_BLOCKS} (signatures per envelope), "
                "ttl 60 s .. 30 days",
            )


def request_digest(payloads: Sequence[bytes]) -> bytes:
    """What an approval names: SHA-256 over the CBOR array of the manifests' SUIT_Digests."""
    return hashlib.sha256(cbor.dumps(list(payloads))).digest()


@dataclass
class CosignRequest:
    """One request as stored (a JSON document in the signing state)."""

    id: str
    requester: str
    role: str
    created: int
    expires: int
    threshold: int
    status: str
    requests: list[dict[str, Any]]  # SigningRequest dicts: the release first, then deltas
    manifests: list[str]  # hex of each encoded SUIT manifest (what the officers sign)
    sequence: int
    approvals: list[dict[str, Any]] = field(default_factory=list)
    envelopes: list[str] = field(default_factory=list)  # hex, once complete
    signed_audit: list[list[Any]] = field(default_factory=list)  # [seq, hash] per envelope
    error: str | None = None

    @property
    def payloads(self) -> list[bytes]:
        """Each manifest's encoded SUIT_Digest: what every officer's signature covers."""
        alg = HashAlg(SigningRequest.from_dict(self.requests[0]).digest_alg)
        return [manifest_digest(bytes.fromhex(m), alg) for m in self.manifests]

    @property
    def digest(self) -> bytes:
        return request_digest(self.payloads)

    def signing_requests(self) -> list[SigningRequest]:
        return [SigningRequest.from_dict(r) for r in self.requests]

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> CosignRequest:
        return cls(**json.loads(text))

    def view(self) -> dict[str, Any]:
        """What the API shows (the envelopes only once complete)."""
        return {
            "id": self.id,
            "status": self.status,
            "requester": self.requester,
            "created": self.created,
            "expires": self.expires,
            "threshold": self.threshold,
            "sequence": self.sequence,
            "request_digest": self.digest.hex(),
            "manifest_digests": [p.hex() for p in self.payloads],
            "requests": self.requests,
            "approvals": [
                {k: a[k] for k in ("officer", "kid", "time", "audit_seq", "public_key")}
                for a in self.approvals
            ],
            "envelopes": [base64.b64encode(bytes.fromhex(e)).decode() for e in self.envelopes],
            "audit": [{"seq": a[0], "hash": a[1]} for a in self.signed_audit],
            "error": self.error,
        }


def _check_bundle(reqs: Sequence[SigningRequest]) -> None:
    """The release first, then deltas of exactly that release (distinct bases)."""
    if not reqs or len(reqs) > MAX_MANIFESTS:
        raise FormatError(
            ErrorCode.MALFORMED, f"a co-signing request holds 1..{MAX_MANIFESTS} manifests"
        )
    full, deltas = reqs[0], reqs[1:]
    if full.delta is not None:
        raise FormatError(ErrorCode.MALFORMED, "the first manifest must be the full release")
    want = fields_json(full.release_fields())
    bases: set[bytes] = set()
    for d in deltas:
        if d.delta is None or fields_json(d.release_fields()) != want:
            raise FormatError(
                ErrorCode.MALFORMED, "every further manifest must be a delta of the same release"
            )
        if d.delta.base_digest in bases:
            raise FormatError(ErrorCode.MALFORMED, "two deltas from the same base")
        bases.add(d.delta.base_digest)


class CosignService:
    def __init__(
        self,
        service: SigningService,
        officers: Mapping[str, Signer],
        config: CosignConfig,
    ) -> None:
        if config.threshold > len(officers):
            raise OtaError(
                ErrorCode.THRESHOLD,
                f"cosign threshold {config.threshold} exceeds the {len(officers)} officers",
            )
        seen: dict[bytes, str] = {}
        for name, signer in officers.items():
            kid = signer.public_key.key_id
            if kid in seen:
                raise OtaError(
                    ErrorCode.DUPLICATE_SIGNER,
                    f"officers {seen[kid]!r} and {name!r} are bound to the same key",
                )
            seen[kid] = name
        self.service = service
        self.officers = dict(officers)
        self.config = config

    # --- API ---------------------------------------------------------------------------------
    def create(self, reqs: Sequence[SigningRequest], requester: Requester) -> CosignRequest:
        """File a request: policy-checked now, manifests fixed now (sequence number included)."""
        svc = self.service
        with svc._lock:
            try:
                return self._create(reqs, requester)
            except PolicyError as err:
                if err.code != ErrorCode.AUTH and reqs:
                    svc._record_refusal(reqs[0], requester, err)
                raise

    def approve(self, request_id: str, officer: Requester, digest: bytes) -> CosignRequest:
        """Sign ``request_id`` with ``officer``'s key if ``digest`` is what it holds."""
        with self.service._lock:
            try:
                return self._approve(request_id, officer, digest)
            except OtaError as err:
                if err.code not in (ErrorCode.AUTH, ErrorCode.NOT_FOUND):
                    self._audit_refusal(request_id, officer, err)
                raise

    def get(self, request_id: str, who: Requester) -> CosignRequest:
        """The request, for its requester or an officer (others: E_FORBIDDEN)."""
        with self.service._lock, self.service.state.transaction() as tx:
            req = self._load(tx, request_id)
            if who.id != req.requester and who.id not in self.officers:
                raise OtaError(ErrorCode.FORBIDDEN, "only the requester and officers may see it")
            if req.status == PENDING and self._now() > req.expires:
                req.status = EXPIRED
                tx.cosign_put(req.id, req.to_json())
            return req

    # --- internals ---------------------------------------------------------------------------
    def _now(self) -> int:
        return int(self.service._clock())

    def _load(self, tx: StateTxn, request_id: str) -> CosignRequest:
        doc = tx.cosign_get(request_id) if _plausible_id(request_id) else None
        if doc is None:
            raise OtaError(ErrorCode.NOT_FOUND, f"no co-signing request {request_id!r}")
        return CosignRequest.from_json(doc)

    def _audit_refusal(self, request_id: str, officer: Requester, err: OtaError) -> None:
        svc = self.service
        try:
            with svc.state.transaction() as tx:
                svc.audit.append(
                    officer.id,
                    OP_COSIGN_REFUSED,
                    {
                        "request": request_id[:64],
                        "role": officer.role.value,
                        "error": err.code.value,
                        "detail": err.detail,
                    },
                )
                tx.set_anchor(svc.audit.head)
        except OtaError as exc:  # the refusal stands even if it cannot be logged
            log.error("could not audit a refused approval: %s", exc)

    def _create(self, reqs: Sequence[SigningRequest], requester: Requester) -> CosignRequest:
        svc, now = self.service, self._now()
        for r in reqs:
            r.validate()
        _check_bundle(reqs)
        full = reqs[0]
        with svc.state.transaction() as tx:
            check_request(svc.policy, full, requester, tx.last_release(str(full.class_id)), now)
            for d in reqs[1:]:
                check_request(svc.policy, d, requester, None, now)
            check_sequence(svc.policy, tx.last_sequence(), now, full.fast_forward)
            sequence = tx.next_sequence(now)
            manifests = [encode_manifest(manifest_info(r, sequence)) for r in reqs]
            req = CosignRequest(
                id="cs_" + secrets.token_hex(12),
                requester=requester.id,
                role=requester.role.value,
                created=now,
                expires=now + self.config.ttl,
                threshold=self.config.threshold,
                status=PENDING,
                requests=[r.to_dict() for r in reqs],
                manifests=[m.hex() for m in manifests],
                sequence=sequence,
            )
            svc.audit.append(
                requester.id,
                OP_REQUEST,
                {
                    "request": req.id,
                    "role": requester.role.value,
                    "model": full.model,
                    "hw_rev": full.hw_rev,
                    "vendor": full.vendor,
                    "version": full.version,
                    "security_counter": full.security_counter,
                    "image_digest": full.image_digest.hex(),
                    "sequence": sequence,
                    "deltas": len(reqs) - 1,
                    "request_digest": req.digest.hex(),
                    "threshold": req.threshold,
                    "expires": req.expires,
                },
            )
            tx.cosign_put(req.id, req.to_json())
            tx.set_anchor(svc.audit.head)
        log.info("co-signing request %s filed by %s", req.id, requester.id)
        return req

    def _approve(self, request_id: str, officer: Requester, digest: bytes) -> CosignRequest:
        svc, now = self.service, self._now()
        signer = self.officers.get(officer.id)
        if signer is None or officer.role not in SIGNING_ROLES:
            raise OtaError(ErrorCode.FORBIDDEN, f"{officer.id!r} is not a co-signing officer")
        with svc.state.transaction() as tx:
            req = self._load(tx, request_id)
            if req.status == PENDING and now > req.expires:
                req.status = EXPIRED
                tx.cosign_put(req.id, req.to_json())
            if req.status == EXPIRED:
                raise OtaError(ErrorCode.REQUEST_EXPIRED, f"request {req.id} has expired")
            if req.status != PENDING:
                raise OtaError(ErrorCode.CONFLICT, f"request {req.id} is already {req.status}")
            if len(digest) != 32 or not secrets.compare_digest(digest, req.digest):
                raise OtaError(
                    ErrorCode.REQUEST_CHANGED,
                    "the request's manifests are not the ones approved (request digest differs)",
                )
            if self.config.four_eyes and officer.id == req.requester:
                raise OtaError(ErrorCode.FOUR_EYES, "a requester may not approve their own request")
            kid = signer.public_key.key_id.hex()
            if any(a["officer"] == officer.id or a["kid"] == kid for a in req.approvals):
                raise OtaError(
                    ErrorCode.DUPLICATE_SIGNER, f"{officer.id!r} has already approved {req.id}"
                )
            sreqs = req.signing_requests()
            for r in sreqs:  # the officer's own grants must cover the release
                check_request(svc.policy, r, officer, None, now)
            payloads = req.payloads
            blocks = [sign1(signer, p, detached=True).encode(tagged=True) for p in payloads]
            _self_check(req, [signer.public_key], [[b] for b in blocks], now)
            head = svc.audit.append(
                officer.id,
                OP_APPROVE,
                {
                    "request": req.id,
                    "requester": req.requester,
                    "kid": kid,
                    "role": officer.role.value,
                    "request_digest": req.digest.hex(),
                    "manifest_digests": [p.hex() for p in payloads],
                    "approval": len(req.approvals) + 1,
                    "threshold": req.threshold,
                },
            )
            req.approvals.append(
                {
                    "officer": officer.id,
                    "kid": kid,
                    "time": now,
                    "audit_seq": head.seq,
                    "public_key": signer.public_key.to_pem().decode(),
                    "blocks": [b.hex() for b in blocks],
                }
            )
            if len(req.approvals) >= req.threshold:
                try:
                    self._complete(tx, req, sreqs, now)
                except OtaError as err:
                    req.status, req.error = FAILED, err.code.value
                    tx.cosign_put(req.id, req.to_json())
                    tx.set_anchor(svc.audit.head)
                    log.warning("co-signing request %s failed at completion: %s", req.id, err)
                    return req
            tx.cosign_put(req.id, req.to_json())
            tx.set_anchor(svc.audit.head)
        log.info("co-signing request %s approved by %s (%d/%d)", req.id, officer.id,
                 len(req.approvals), req.threshold)  # fmt: skip
        return req

    def _complete(
        self, tx: StateTxn, req: CosignRequest, sreqs: list[SigningRequest], now: int
    ) -> None:
        """k approvals: re-check the floors (another release may have been signed meanwhile),
        assemble and verify the envelopes, record them as signed."""
        svc = self.service
        full = sreqs[0]
        class_hex = str(full.class_id)
        requester = Requester(req.requester, Role(req.role))
        last = tx.last_release(class_hex)
        check_request(svc.policy, full, requester, last, now)
        if last is not None and last.sequence >= req.sequence:
            raise PolicyError(
                ErrorCode.CONFLICT,
                "a later release of this class was signed while the request waited",
            )
        keys = [PublicKey.from_pem(a["public_key"].encode()) for a in req.approvals]
        per_manifest = [
            [bytes.fromhex(a["blocks"][i]) for a in req.approvals] for i in range(len(sreqs))
        ]
        envelopes = _self_check(req, keys, per_manifest, now)
        key_ids = [a["kid"] for a in req.approvals]
        payloads = req.payloads
        for i, (r, env) in enumerate(zip(sreqs, envelopes, strict=True)):
            info = manifest_info(r, req.sequence)
            subject = sign_subject(r, info, requester, key_ids, payloads[i], env)
            subject["cosign_request"] = req.id
            subject["approvers"] = [a["officer"] for a in req.approvals]
            head = svc.audit.append(req.requester, OP_SIGN, subject)
            req.signed_audit.append([head.seq, head.hash])
            if i == 0:
                tx.record_release(
                    class_hex, r.vendor, r.model, r.hw_rev, r.version, r.security_counter,
                    req.sequence, now,
                )  # fmt: skip
                tx.record_image(
                    class_hex, r.version, r.image_digest.hex(), req.sequence,
                    fields_json(r.release_fields()),
                )  # fmt: skip
            elif _delta_sequence(tx, r, class_hex) != req.sequence:
                raise OtaError(ErrorCode.INTERNAL, "delta and release sequence differ")
        req.status = COMPLETE
        req.envelopes = [e.hex() for e in envelopes]
        log.info("co-signing request %s complete", req.id)


def _self_check(
    req: CosignRequest, keys: list[PublicKey], blocks: list[list[bytes]], now: int
) -> list[bytes]:
    """Assemble each manifest with its blocks; every key must verify and the manifest must say
    exactly what was requested (a faulty HSM signature never counts as an approval)."""
    out = []
    for i, (r, mhex) in enumerate(zip(req.signing_requests(), req.manifests, strict=True)):
        manifest = bytes.fromhex(mhex)
        payload = manifest_digest(manifest, HashAlg(r.digest_alg))
        env = assemble_envelope(manifest, payload, blocks[i])
        try:
            vm = verify_envelope(env, StaticKeys(keys, len(keys)), now=now)
        except OtaError as err:
            raise OtaError(
                ErrorCode.INTERNAL, f"co-signed envelope does not verify: {err}"
            ) from None
        want: ManifestInfo = manifest_info(r, req.sequence)
        if vm.info != want:
            raise OtaError(ErrorCode.INTERNAL, "co-signed envelope does not say what was asked")
        out.append(env)
    return out


def _plausible_id(text: str) -> bool:
    return (
        len(text) == 27
        and text.startswith("cs_")
        and all(c in "0123456789abcdef" for c in text[3:])
    )
