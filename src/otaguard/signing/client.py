"""Client for the HTTP signing service, used by ``release create --signing-url``.

The only secret CI holds is the request token (from ``$OTAGUARD_SIGNING_TOKEN``). The client
does not trust the service blindly: the returned envelope is verified (against a pinned key if
given, else the key the service reports) and must say exactly what was requested.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ..crypto.keys import PublicKey
from ..errors import ErrorCode, FormatError, OtaError
from ..mcuboot.image import Geometry, ImageVersion, prepare
from .audit import AuditHead
from .mcuboot import mcuboot_body
from .policy import SigningRequest

TOKEN_ENV = "OTAGUARD_SIGNING_TOKEN"
MAX_RESPONSE = 256 * 1024


@dataclass(frozen=True)
class RemoteMcuboot:
    image: bytes  # the whole signed MCUboot image (verified by the caller)
    sequence: int
    key_id: str
    audit: AuditHead


@dataclass(frozen=True)
class RemoteSignature:
    envelope: bytes
    sequence: int
    manifest_digest: bytes
    key_ids: tuple[str, ...]
    audit: AuditHead


class SigningClient:
    def __init__(
        self,
        url: str,
        token: str,
        *,
        ca_file: Path | None = None,
        timeout: float = 60.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not token:
            raise OtaError(ErrorCode.AUTH, f"no signing token (set ${TOKEN_ENV})")
        verify: ssl.SSLContext | bool = True
        if ca_file is not None:
            try:
                verify = ssl.create_default_context(cafile=str(ca_file))
            except (OSError, ssl.SSLError) as exc:
                raise OtaError(ErrorCode.USAGE, f"cannot load CA file {ca_file}: {exc}") from None
        self._http = httpx.Client(
            base_url=url.rstrip("/"),
            headers={"Authorization": f"Bearer {token}"},
            verify=verify,
            timeout=timeout,
            transport=transport,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> SigningClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kw: Any) -> dict[str, Any]:
        try:
            resp = self._http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            raise OtaError(ErrorCode.TRANSPORT, f"signing service: {exc}") from None
        if len(resp.content) > MAX_RESPONSE:
            raise OtaError(ErrorCode.TOO_LARGE, "signing service response too large")
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code != 200:
            if isinstance(body, dict) and isinstance(body.get("error"), str):
                try:
                    code = ErrorCode(body["error"])
                except ValueError:
                    code = ErrorCode.TRANSPORT
                raise OtaError(code, f"signing service: {body.get('detail', '')}")
            raise OtaError(ErrorCode.TRANSPORT, f"signing service: HTTP {resp.status_code}")
        if not isinstance(body, dict):
            raise FormatError(ErrorCode.MALFORMED, "signing service returned no JSON object")
        return body

    def public_key(self) -> PublicKey:
        body = self._call("GET", "/v1/public-key")
        pem = body.get("pem")
        if not isinstance(pem, str):
            raise FormatError(ErrorCode.MALFORMED, "public-key response lacks pem")
        return PublicKey.from_pem(pem.encode())

    def sign(self, request: SigningRequest) -> RemoteSignature:
        body = self._call("POST", "/v1/sign", json=request.to_dict())
        try:
            audit = body["audit"]
            return RemoteSignature(
                envelope=base64.b64decode(body["envelope"], validate=True),
                sequence=int(body["sequence"]),
                manifest_digest=bytes.fromhex(body["manifest_digest"]),
                key_ids=tuple(str(k) for k in body["key_ids"]),
                audit=AuditHead(int(audit["seq"]), str(audit["hash"])),
            )
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise FormatError(ErrorCode.MALFORMED, "malformed signing service response") from None

    def sign_mcuboot(
        self, request: SigningRequest, image: bytes, geometry: Geometry
    ) -> RemoteMcuboot:
        """The MCUboot image of ``image`` for the already-signed release ``request``.

        Only the TLV area travels back: header + image + protected TLVs are laid out here
        (deterministic, bounds checked before the upload), so the caller verifies exactly the
        bytes it will ship."""
        unsigned = prepare(
            image, ImageVersion.from_release(request.version), request.security_counter, geometry
        )
        body = self._call("POST", "/v1/sign-mcuboot", json=mcuboot_body(request, image, geometry))
        try:
            signed = unsigned.payload + base64.b64decode(body["tlvs"], validate=True)
            audit = body["audit"]
            result = RemoteMcuboot(
                image=signed,
                sequence=int(body["sequence"]),
                key_id=str(body["key_id"]),
                audit=AuditHead(int(audit["seq"]), str(audit["hash"])),
            )
            sha = str(body["mcuboot_sha256"])
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise FormatError(ErrorCode.MALFORMED, "malformed signing service response") from None
        if hashlib.sha256(signed).hexdigest() != sha:
            raise OtaError(ErrorCode.DIGEST, "MCUboot image differs from what the service signed")
        return result

    def sign_tuf_targets(
        self, request: SigningRequest, previous: bytes | None = None
    ) -> tuple[bytes, int, AuditHead]:
        """TUF targets.json for a release the service signed: (document, version, audit)."""
        body = self._call(
            "POST",
            "/v1/sign-tuf-targets",
            json={
                "request": request.to_dict(),
                "previous_b64": base64.b64encode(previous).decode() if previous else None,
            },
        )
        try:
            audit = body["audit"]
            return (
                base64.b64decode(body["targets_b64"], validate=True),
                int(body["version"]),
                AuditHead(int(audit["seq"]), str(audit["hash"])),
            )
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise FormatError(ErrorCode.MALFORMED, "malformed signing service response") from None

    # --- co-signing (signing/cosign.py) ------------------------------------------------------
    def cosign_create(self, requests: list[SigningRequest]) -> dict[str, Any]:
        """File a co-signing request (the release first, then its deltas); its view."""
        return self._call("POST", "/v1/cosign", json={"requests": [r.to_dict() for r in requests]})

    def cosign_get(self, request_id: str) -> dict[str, Any]:
        return self._call("GET", f"/v1/cosign/{_path_id(request_id)}")

    def cosign_approve(self, request_id: str, request_digest: str) -> dict[str, Any]:
        """Sign ``request_id`` with the calling officer's key; ``request_digest`` is what the
        officer reviewed (the service refuses if the request holds anything else)."""
        return self._call(
            "POST",
            f"/v1/cosign/{_path_id(request_id)}/approve",
            json={"request_digest": request_digest},
        )


def _path_id(request_id: str) -> str:
    if not request_id or not all(c.isalnum() or c in "_-" for c in request_id):
        raise OtaError(ErrorCode.USAGE, f"not a co-signing request id: {request_id!r}")
    return request_id
