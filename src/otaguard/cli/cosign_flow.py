"""The requester's side of co-signing (``release create --signing-url URL --cosign``).

The release and its deltas go to the signing service as one co-signing request; the command
then waits (``--wait`` seconds, polling) until the officers have approved it. If the wait runs
out the request stays filed: ``--cosign-id ID`` picks it up again, with the same image and
options (the rebuilt request must be exactly the filed one, else ``E_REQUEST_CHANGED``).
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable, Sequence
from typing import Any

import click

from ..crypto.keys import PublicKey
from ..errors import ErrorCode, FormatError, OtaError
from ..signing.audit import AuditHead
from ..signing.client import SigningClient
from ..signing.policy import SigningRequest


class CosignFlow:
    def __init__(
        self,
        client: SigningClient,
        request_id: str | None,
        *,
        wait: float,
        poll: float,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self.request_id = request_id
        self.wait = wait
        self.poll = poll
        self._sleep = sleep
        self._clock = clock
        self.view: dict[str, Any] | None = client.cosign_get(request_id) if request_id else None

    def filed_expires(self) -> int | None:
        """The expiry the filed request carries (a resumed request keeps it)."""
        assert self.view is not None
        first = _requests(self.view)[0]
        return first.expires

    def sign_batch(self, reqs: Sequence[SigningRequest]) -> list[tuple[bytes, AuditHead]]:
        if self.view is None:
            self.view = self.client.cosign_create(list(reqs))
            self.request_id = str(self.view["id"])
            click.echo(
                f"co-signing request {self.request_id} filed: waiting for "
                f"{self.view['threshold']} officer approvals (request digest "
                f"{self.view['request_digest']})",
                err=True,
            )
        elif _requests(self.view) != list(reqs):
            raise OtaError(
                ErrorCode.REQUEST_CHANGED,
                f"request {self.request_id} was filed for another image or other options",
            )
        assert self.request_id is not None
        deadline = self._clock() + self.wait
        while True:
            status = self.view.get("status")
            if status == "complete":
                return _envelopes(self.view, len(reqs))
            if status == "expired":
                raise OtaError(ErrorCode.REQUEST_EXPIRED, f"request {self.request_id} expired")
            if status == "failed":
                code = _code(self.view.get("error"))
                raise OtaError(code, f"request {self.request_id} failed when completed")
            if self._clock() >= deadline:
                n = len(self.view.get("approvals", []))
                raise OtaError(
                    ErrorCode.PENDING,
                    f"request {self.request_id} has {n} of {self.view['threshold']} approvals; "
                    f"re-run with --cosign-id {self.request_id} once the officers approved it",
                )
            self._sleep(self.poll)
            self.view = self.client.cosign_get(self.request_id)

    def keys(self) -> list[PublicKey]:
        """The approving officers' keys as the service reports them (use --trust-key to pin)."""
        assert self.view is not None
        return [PublicKey.from_pem(str(a["public_key"]).encode()) for a in self.view["approvals"]]

    @property
    def threshold(self) -> int:
        assert self.view is not None
        return int(self.view["threshold"])


def _requests(view: dict[str, Any]) -> list[SigningRequest]:
    items = view.get("requests")
    if not isinstance(items, list) or not items:
        raise FormatError(ErrorCode.MALFORMED, "co-signing request without manifests")
    return [SigningRequest.from_dict(x) for x in items]


def _envelopes(view: dict[str, Any], n: int) -> list[tuple[bytes, AuditHead]]:
    try:
        envs = [base64.b64decode(e, validate=True) for e in view["envelopes"]]
        heads = [AuditHead(int(a["seq"]), str(a["hash"])) for a in view["audit"]]
    except (KeyError, TypeError, ValueError, binascii.Error):
        raise FormatError(ErrorCode.MALFORMED, "malformed co-signing response") from None
    if len(envs) != n or len(heads) != n:
        raise FormatError(ErrorCode.MALFORMED, "co-signing response holds other manifests")
    return list(zip(envs, heads, strict=True))


def _code(value: object) -> ErrorCode:
    try:
        return ErrorCode(str(value))
    except ValueError:
        return ErrorCode.INTERNAL
