"""The admin-API client shared by ``otaguard campaign`` and ``otaguard rotation``.

The bearer token comes from ``OTAGUARD_ADMIN_TOKEN`` (never the command line); the admin
listener's certificate is checked against ``--ca-file`` (the fleet CA), not the system trust
store. Server refusals come back as the server's own ``E_*`` code.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import Any

import httpx

from ..errors import ErrorCode, OtaError, UsageError

TOKEN_ENV = "OTAGUARD_ADMIN_TOKEN"
SERVER_ENV = "OTAGUARD_SERVER"
CA_ENV = "OTAGUARD_ADMIN_CA"


def _client(server: str, ca_file: Path | None) -> httpx.Client:
    token = os.environ.get(TOKEN_ENV)
    if not token:
        raise UsageError(ErrorCode.AUTH, f"set {TOKEN_ENV} to an admin bearer token")
    verify: ssl.SSLContext | bool = True
    if ca_file is not None:
        verify = ssl.create_default_context(cafile=str(ca_file))
    return httpx.Client(
        base_url=server.rstrip("/"),
        verify=verify,
        timeout=30,
        headers={"Authorization": f"Bearer {token}"},
    )


def admin_call(
    server: str, ca_file: Path | None, method: str, path: str, body: Any = None, **kw: Any
) -> Any:
    """One admin request; returns the decoded JSON or raises OtaError with the server's code."""
    try:
        with _client(server, ca_file) as c:
            r = c.request(method, path, json=body, **kw)
    except httpx.HTTPError as exc:
        raise OtaError(ErrorCode.TRANSPORT, f"{server}: {exc}") from None
    try:
        data = r.json()
    except ValueError:
        raise OtaError(ErrorCode.TRANSPORT, f"HTTP {r.status_code}: not JSON") from None
    if r.status_code >= 400:
        try:
            code = ErrorCode(data.get("error"))
        except ValueError:
            code = ErrorCode.INTERNAL
        raise OtaError(code, f"HTTP {r.status_code}: {data.get('detail', '')}")
    return data
