"""An update source at a URL: a release directory (``manifest.suit`` + ``image.bin``) served
over HTTP(S), for ``otaguard agent install URL`` (a technician's laptop, a local mirror).

Trust does not come from the connection: the manifest is verified before a single image byte
is requested, and the image must hash to what it signs. TLS, when used, is checked against the
CA file given (else the system's store). Every read is bounded: the manifest by the envelope
size limit (refused from a declared ``Content-Length`` before a body byte is read), the image by
the signed size (the slot writer refuses the first byte past it); each read has a timeout.
Downloads resume with ``Range`` from the offset the agent asks for.
"""

from __future__ import annotations

import http.client
import ssl
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import DeviceError, ErrorCode
from ..manifest.verify import MAX_ENVELOPE_SIZE
from .transport import from_offset

CHUNK = 64 * 1024
NET_ERRORS = (OSError, http.client.HTTPException)


class UrlTransport:
    def __init__(self, base_url: str, *, ca_file: Path | None = None, timeout: float = 30.0):
        parts = urllib.parse.urlsplit(base_url.rstrip("/") + "/")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DeviceError(ErrorCode.USAGE, f"not an http(s) URL: {base_url}")
        self.parts = parts
        self.timeout = timeout
        self.ctx: ssl.SSLContext | None = None
        if parts.scheme == "https":
            self.ctx = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self.events: list[dict[str, Any]] = []

    @property
    def endpoint(self) -> str:
        return urllib.parse.urlunsplit(self.parts)

    def _get(self, name: str, offset: int = 0) -> tuple[http.client.HTTPConnection, Any]:
        p = self.parts
        conn: http.client.HTTPConnection
        if self.ctx is not None:
            conn = http.client.HTTPSConnection(
                p.hostname or "", p.port, timeout=self.timeout, context=self.ctx
            )
        else:
            conn = http.client.HTTPConnection(p.hostname or "", p.port, timeout=self.timeout)
        headers = {"Accept-Encoding": "identity"}
        if offset:
            headers["Range"] = f"bytes={offset}-"
        try:
            conn.request("GET", p.path + urllib.parse.quote(name), headers=headers)
            resp = conn.getresponse()
        except NET_ERRORS as exc:
            conn.close()
            raise DeviceError(ErrorCode.TRANSPORT, f"GET {name}: {exc}") from None
        if resp.status not in (200, 206):
            conn.close()
            raise DeviceError(ErrorCode.TRANSPORT, f"GET {name}: HTTP {resp.status}")
        return conn, resp

    def fetch_manifest(self) -> bytes:
        conn, resp = self._get("manifest.suit")
        try:
            declared = resp.getheader("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > MAX_ENVELOPE_SIZE:
                raise DeviceError(ErrorCode.TOO_LARGE, f"manifest of {declared} bytes refused")
            data: bytes = resp.read(MAX_ENVELOPE_SIZE + 1)
        except NET_ERRORS as exc:
            raise DeviceError(ErrorCode.TRANSPORT, f"manifest download failed: {exc}") from None
        finally:
            conn.close()
        if len(data) > MAX_ENVELOPE_SIZE:
            raise DeviceError(ErrorCode.TOO_LARGE, "manifest larger than the envelope limit")
        return data

    def open_image(self, offset: int) -> Iterator[bytes]:
        conn, resp = self._get("image.bin", offset)
        body = iter(lambda: resp.read(CHUNK), b"")
        try:
            yield from from_offset(body, offset if resp.status == 200 else 0)
        except NET_ERRORS as exc:
            raise DeviceError(ErrorCode.TRANSPORT, f"image download interrupted: {exc}") from None
        finally:
            conn.close()

    def report(self, event: dict[str, Any]) -> None:
        self.events.append(event)
