"""The co-signing request as a state machine (pending → complete | expired), against a model:
any sequence of approvals by officers, outsiders and the requester, right or wrong digests,
and the clock moving, gives exactly the model's answer and status at every step."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from otaguard.crypto.software import SoftwareSigner
from otaguard.errors import ErrorCode, OtaError
from otaguard.manifest.verify import verify_envelope
from otaguard.signing.audit import AuditLog, read_records
from otaguard.signing.cosign import CosignConfig, CosignService
from otaguard.signing.policy import Grant, Policy, Requester, Role, SigningRequest
from otaguard.signing.service import SigningService
from otaguard.signing.state import SigningState
from otaguard.trust.model import StaticKeys

from .test_signing_http import body

T0 = 1_900_000_000
TTL = 3600
OFFICERS = ("alice", "bob", "carol", "dave")  # dave's grant is for another vendor
EVERYONE = (*OFFICERS, "ci")
KEYS = {n: SoftwareSigner(ed25519.Ed25519PrivateKey.generate()) for n in OFFICERS}
SEAL = SoftwareSigner(ed25519.Ed25519PrivateKey.generate())

action = st.one_of(
    st.tuples(st.just("approve"), st.sampled_from(EVERYONE), st.booleans()),
    st.tuples(st.just("wait"), st.sampled_from(["", ""]), st.integers(0, 2000)),
)


@settings(max_examples=40, deadline=None)
@given(
    threshold=st.integers(1, 3),
    requester=st.sampled_from(["ci", "alice"]),
    actions=st.lists(action, max_size=10),
)
def test_cosign_request_follows_the_model(
    threshold: int, requester: str, actions: list[tuple[str, str, Any]]
) -> None:
    now = [T0]
    grants = {n: (Grant("example.com"),) for n in ("ci", "alice", "bob", "carol")}
    grants["dave"] = (Grant("other.example"),)
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "audit.log"
        svc = SigningService(
            SEAL,
            Policy(grants=grants),
            AuditLog.open(log_path, SEAL),
            SigningState(Path(tmp) / "s.sqlite"),
            clock=lambda: now[0],
        )
        cs = CosignService(svc, KEYS, CosignConfig(threshold, ttl=TTL, four_eyes=True))
        who = {n: Requester(n, Role.SECURITY_OFFICER if n in OFFICERS else Role.RELEASE)
               for n in EVERYONE}  # fmt: skip
        req = SigningRequest.from_dict(body(expires=T0 + 30 * 86400))
        filed = cs.create([req], who[requester])
        rid, digest = filed.id, filed.digest
        status, approved = "pending", []  # the model
        for kind, name, arg in actions:
            if kind == "wait":
                now[0] += arg
                continue
            if name not in OFFICERS:
                want: ErrorCode | None = ErrorCode.FORBIDDEN
            else:
                if status == "pending" and now[0] > filed.expires:
                    status = "expired"
                if status == "expired":
                    want = ErrorCode.REQUEST_EXPIRED
                elif status == "complete":
                    want = ErrorCode.CONFLICT
                elif not arg:
                    want = ErrorCode.REQUEST_CHANGED
                elif name == requester:
                    want = ErrorCode.FOUR_EYES
                elif name in approved:
                    want = ErrorCode.DUPLICATE_SIGNER
                elif name == "dave":
                    want = ErrorCode.POLICY
                else:
                    want = None
            got: ErrorCode | None = None
            try:
                cs.approve(rid, who[name], digest if arg else bytes(32))
            except OtaError as err:
                got = err.code
            assert got == want, (kind, name, arg)
            if want is None:
                approved.append(name)
                if len(approved) == threshold:
                    status = "complete"
            view = cs.get(rid, who[requester])
            if status == "pending" and now[0] > filed.expires:
                status = "expired"  # reading a lapsed request marks it too
            assert view.status == status
            assert [a["officer"] for a in view.approvals] == approved
            assert bool(view.envelopes) == (status == "complete")
        ops = [r.op for r in read_records(log_path)]
        assert ops.count("cosign-approve") == len(approved)
        assert ops.count("sign-manifest") == (1 if status == "complete" else 0)
        final = cs.get(rid, who[requester])
        if status == "complete":
            keys = StaticKeys([KEYS[n].public_key for n in approved], threshold)
            vm = verify_envelope(bytes.fromhex(final.envelopes[0]), keys, now=T0)
            assert len(vm.signers) == threshold
        svc.close()
