"""The device's HTTPS client for the update server (implements ``device.transport.Transport``).

Trust is pinned, never the system store: the TLS context trusts only the fleet CA the device
was provisioned with, and optionally also requires the server certificate's SPKI SHA-256 to
be one of a configured set (so even another certificate from the same CA is refused). The
device authenticates with its client certificate.

Failures back off exponentially with full jitter, honouring the server's ``Retry-After`` on
429/503, so a fleet that lost its server does not come back as a synchronized stampede.
Image and patch downloads resume with HTTP Range from the offset the agent asks for; a server
that ignores the range (200 instead of 206) is handled by skipping the prefix. When the
check-in offered a delta for the running image (``update["delta"]``), the agent gets its
manifest from :meth:`fetch_delta_manifest` and the patch from :meth:`open_patch`, with the
full image as fallback.

Nothing the server sends is read without a bound: JSON bodies (check-in, reports, error
details), manifests and key lists each have a hard cap, enforced first against a declared
``Content-Length`` (refused before a body byte is read) and then by counting bytes as they
arrive (a chunked or lying body is cut off at the cap), E_TOO_LARGE. Image and patch bodies are
bounded by the signed size: the agent's slot writer refuses the first byte past it
(E_IMAGE_SIZE) and stops reading. ``deadline`` (seconds, optional) bounds the total time of any
one body download, so a server dripping bytes just inside the per-read timeout cannot hold the
device forever (slow retrieval, E_TRANSPORT).
"""

from __future__ import annotations

import hashlib
import http.client
import json
import random
import select
import ssl
import time
import urllib.parse
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ..errors import DeviceError, ErrorCode, OtaError
from ..fsutil import atomic_write
from .transport import from_offset

MAX_MANIFEST = 64 * 1024
MAX_JSON = 64 * 1024
MAX_KEYLIST = 64 * 1024  # TrustStore.apply_update refuses larger lists anyway
MAX_CERT = 16 * 1024  # a renewed device certificate (PEM)
CHUNK = 64 * 1024
MAX_URL = 2048  # a URL from the server (manifest, image, patch): no spaces or controls
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
# What a refused or retried response's body may be read (and thrown away) to keep the
# connection; a larger one closes the connection instead.
DRAIN_LIMIT = 64 * 1024
# Everything the network or a misbehaving server can raise while a request is on the wire:
# socket and TLS errors (OSError: refused, reset, timeout, handshake/verification failure) and
# HTTP framing errors (http.client.HTTPException: bad status line, too many or too long
# headers, a body cut short).
NET_ERRORS = (OSError, http.client.HTTPException)

Origin = tuple[str, int]


# Installs the client certificate and key into a context; the default is a key file. A device
# whose key lives in a TPM passes one that signs in the TPM (linux/tpmtls.py).
KeyLoader = Callable[[ssl.SSLContext, Path, Path], None]


def load_key_file(ctx: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
    ctx.load_cert_chain(str(cert_file), str(key_file))


def pinned_context(
    ca_file: Path, cert_file: Path, key_file: Path, key_loader: KeyLoader = load_key_file
) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verify + hostname check on, no system CAs
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(ca_file))
    key_loader(ctx, cert_file, key_file)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


class _Conn:
    """One keep-alive HTTP/1.1 connection to one origin, and when it went idle."""

    __slots__ = ("http", "idle_since")

    def __init__(self, http_conn: http.client.HTTPSConnection) -> None:
        self.http = http_conn
        self.idle_since: float | None = None


class HttpsTransport:
    """HTTP/1.1 over the standard library (``http.client``) on the pinned ``ssl`` context: one
    keep-alive connection per origin, reopened on demand (the SPKI pin is checked on every new
    connection, before a request byte is sent). :meth:`close` closes the connections; the
    transport stays usable and reconnects at its next request."""

    def __init__(
        self,
        base_url: str,
        *,
        ca_file: Path,
        cert_file: Path,
        key_file: Path,
        spki_pins: set[str] | None = None,
        status: Callable[[], dict[str, Any]] | None = None,
        max_attempts: int = 6,
        base_delay: float = 0.5,
        max_delay: float = 300.0,
        timeout: float = 30.0,
        deadline: float | None = None,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        keepalive_expiry: float | None = 5.0,
        key_loader: KeyLoader = load_key_file,
    ) -> None:
        """``keepalive_expiry``: seconds (on ``clock``) an idle connection is kept for reuse
        (5 s by default; None keeps it until the server closes it, as a device polling over
        one long-lived connection does). A connection the server has closed meanwhile is
        noticed before reuse and replaced without costing a retry."""
        self.base_url = base_url.rstrip("/")
        parts = urllib.parse.urlsplit(self.base_url)
        if parts.scheme != "https" or not parts.hostname:
            raise DeviceError(ErrorCode.USAGE, f"update server URL must be https://: {base_url}")
        self._origin: Origin = (parts.hostname, parts.port or 443)
        self._prefix = parts.path.rstrip("/")
        self._pins = {p.lower() for p in spki_pins} if spki_pins else None
        self._status = status
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self._sleep = sleep
        self.deadline = deadline
        self._clock = clock
        self._rng = rng or random.SystemRandom()
        self._timeout = timeout
        self._keepalive = keepalive_expiry
        self._ca_file, self._cert_file, self._key_file = ca_file, cert_file, key_file
        self._key_loader = key_loader
        self._ctx = pinned_context(ca_file, cert_file, key_file, key_loader)
        self._conns: dict[Origin, _Conn] = {}
        self.update: dict[str, Any] | None = None
        self.last_checkin: dict[str, Any] | None = None

    @property
    def endpoint(self) -> str:
        return self.base_url

    def close(self) -> None:
        conns, self._conns = self._conns, {}
        for c in conns.values():
            c.http.close()

    # --- plumbing ------------------------------------------------------------------------------
    def _target(self, url: str) -> tuple[Origin, str]:
        """(origin, request target) of a path on the update server or an absolute https URL
        the server handed out (verified with the same pinned context)."""
        if len(url) > MAX_URL or any(ch <= " " or ch == "\x7f" for ch in url):
            raise DeviceError(ErrorCode.MALFORMED, f"refusing a malformed URL: {url[:100]!r}")
        if url.startswith("/") and not url.startswith("//"):
            return self._origin, self._prefix + url
        parts = urllib.parse.urlsplit(url)
        if parts.scheme != "https" or not parts.hostname:
            raise DeviceError(ErrorCode.MALFORMED, f"refusing a non-https URL: {url[:100]!r}")
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return (parts.hostname, parts.port or 443), target

    def _check_pin(self, sock: Any) -> None:
        if self._pins is None:
            return
        der = sock.getpeercert(True) if isinstance(sock, ssl.SSLSocket) else None
        if not der:
            raise DeviceError(ErrorCode.CERT, "cannot read the server certificate for pinning")
        spki = (
            x509.load_der_x509_certificate(der)
            .public_key()
            .public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )
        if hashlib.sha256(spki).hexdigest() not in self._pins:
            raise DeviceError(ErrorCode.CERT, "server certificate does not match the SPKI pin")

    def _connection(self, origin: Origin) -> _Conn:
        """A connected, pinned connection to ``origin``: the idle one if it is still good."""
        c = self._conns.get(origin)
        if c is not None and c.http.sock is not None:
            if c.idle_since is None:
                c.http.close()  # an earlier response was abandoned unread: not reusable
            elif (
                self._keepalive is not None and self._clock() - c.idle_since > self._keepalive
            ) or _readable(c.http.sock):  # readable while idle: the server closed it (or junk)
                c.http.close()
        if c is None:
            c = _Conn(
                http.client.HTTPSConnection(
                    origin[0], origin[1], timeout=self._timeout, context=self._ctx
                )
            )
            self._conns[origin] = c
        c.idle_since = None
        if c.http.sock is None:
            try:
                c.http.connect()
                self._check_pin(c.http.sock)
            except BaseException:
                c.http.close()
                raise
        return c

    def _delay(self, attempt: int, retry_after: str | None) -> float:
        cap = min(self.max_delay, self.base_delay * (2**attempt))
        delay = self._rng.uniform(0, cap)  # full jitter
        if retry_after is not None and retry_after.strip().isdigit():
            delay = max(delay, min(float(retry_after), self.max_delay))
        return delay

    def _request(
        self,
        method: str,
        url: str,
        *,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> _Response:
        """Send with retries; return a response whose status is not retryable (body unread)."""
        origin, target = self._target(url)
        hdrs = {"Accept-Encoding": "identity"}  # bodies are read raw: no compression bombs
        if headers:
            hdrs.update(headers)
        if body is not None:
            hdrs.setdefault("Content-Type", "application/json")
        last: str = ""
        for attempt in range(self.max_attempts):
            retry_after: str | None = None
            try:
                c = self._connection(origin)
                try:
                    c.http.request(method, target, body=body, headers=hdrs)
                    raw = c.http.getresponse()
                except BaseException:
                    c.http.close()
                    raise
                resp = _Response(raw, c, self._clock)
                if resp.status not in RETRY_STATUSES:
                    return resp
                retry_after = resp.header("retry-after")
                last = f"HTTP {resp.status}"
                resp.discard()
            except NET_ERRORS as exc:
                last = f"{type(exc).__name__}: {exc}"
            if attempt + 1 < self.max_attempts:
                self._sleep(self._delay(attempt, retry_after))
        raise DeviceError(ErrorCode.TRANSPORT, f"{method} {url} failed: {last}")

    def _check_deadline(self, started: float, what: str) -> None:
        if self.deadline is not None and self._clock() - started > self.deadline:
            raise DeviceError(
                ErrorCode.TRANSPORT, f"{what}: download exceeded its {self.deadline:g} s deadline"
            )

    def _read_bounded(self, resp: _Response, limit: int, what: str) -> bytes:
        """The whole body, refused as soon as it is known to exceed ``limit``; closes ``resp``."""
        started = self._clock()
        try:
            declared = resp.header("content-length")
            if declared is not None:
                if not declared.strip().isdigit():
                    raise DeviceError(ErrorCode.MALFORMED, f"{what}: bad Content-Length")
                if int(declared) > limit:
                    raise DeviceError(
                        ErrorCode.TOO_LARGE, f"{what}: {int(declared)} bytes declared (max {limit})"
                    )
            buf = bytearray()
            for chunk in resp.iter_raw():
                buf += chunk
                if len(buf) > limit:
                    raise DeviceError(ErrorCode.TOO_LARGE, f"{what}: over the {limit}-byte limit")
                self._check_deadline(started, what)
        except NET_ERRORS as exc:
            raise DeviceError(ErrorCode.TRANSPORT, f"{what}: {type(exc).__name__}: {exc}") from None
        finally:
            resp.close()
        return bytes(buf)

    def _error(self, resp: _Response) -> OtaError:
        status = resp.status
        try:
            obj = json.loads(self._read_bounded(resp, MAX_JSON, "error response"))
            code = ErrorCode(obj["error"])
            detail = str(obj.get("detail", ""))
        except (ValueError, KeyError, TypeError):
            code, detail = ErrorCode.TRANSPORT, f"HTTP {status}"
        return DeviceError(code, f"server: {detail}")

    def _json(self, method: str, url: str, body: dict[str, Any] | None = None) -> Any:
        data = None
        if body is not None:
            data = json.dumps(body, separators=(",", ":"), allow_nan=False).encode()
        resp = self._request(method, url, body=data)
        if resp.status >= 400:
            raise self._error(resp)
        raw = self._read_bounded(resp, MAX_JSON, "server response")
        try:
            return json.loads(raw)
        except ValueError:
            raise DeviceError(ErrorCode.MALFORMED, "server response is not JSON") from None

    # --- API -----------------------------------------------------------------------------------
    def checkin(self, facts: dict[str, Any] | None = None) -> dict[str, Any] | None:
        body = facts if facts is not None else (self._status() if self._status else {})
        result = self._json("POST", "/v1/checkin", body)
        if not isinstance(result, dict):
            raise DeviceError(ErrorCode.MALFORMED, "check-in response is not an object")
        self.last_checkin = result
        upd = result.get("update")
        self.update = upd if isinstance(upd, dict) else None
        return self.update

    def _need_update(self) -> dict[str, Any]:
        if self.update is None:
            self.checkin()
        if self.update is None:
            raise DeviceError(ErrorCode.NOT_FOUND, "no update offered")
        return self.update

    def fetch_manifest(self) -> bytes:
        return self._get_manifest(str(self._need_update()["manifest_url"]))

    def fetch_delta_manifest(self) -> bytes | None:
        """The delta manifest the server offered for our running image, or None."""
        delta = self._need_update().get("delta")
        if not isinstance(delta, dict):
            return None
        return self._get_manifest(str(delta["manifest_url"]))

    def _get_manifest(self, url: str) -> bytes:
        resp = self._request("GET", url)
        if resp.status != 200:
            raise self._error(resp)
        return self._read_bounded(resp, MAX_MANIFEST, "manifest")

    def open_image(self, offset: int) -> Iterator[bytes]:
        return self._open_blob(str(self._need_update()["image_url"]), offset, "image")

    def open_patch(self, offset: int) -> Iterator[bytes]:
        """The offered delta's patch from ``offset`` (HTTP Range), like an image."""
        delta = self._need_update().get("delta")
        if not isinstance(delta, dict):
            raise DeviceError(ErrorCode.NOT_FOUND, "no delta offered")
        return self._open_blob(str(delta["patch_url"]), offset, "patch")

    def _open_blob(self, url: str, offset: int, what: str) -> Iterator[bytes]:
        headers = {"Range": f"bytes={offset}-"} if offset > 0 else {}
        resp = self._request("GET", url, headers=headers)
        if resp.status == 416:
            resp.discard()
            return
        if resp.status not in (200, 206):
            raise self._error(resp)
        started = self._clock()
        try:
            for chunk in from_offset(resp.iter_raw(), offset if resp.status == 200 else 0):
                self._check_deadline(started, what)
                yield chunk
        except NET_ERRORS as exc:
            raise DeviceError(ErrorCode.TRANSPORT, f"{what} download interrupted: {exc}") from None
        finally:
            resp.close()

    def report(self, event: dict[str, Any]) -> None:
        """Send a status report; retried with the same report_id, so it is counted once."""
        body = dict(event)
        if "state" not in body:
            # The agent's events: {"event": "installed"|"error"|..., ...}
            name = str(body.get("event", "unknown"))
            body["state"] = "failed" if name == "error" else name.replace("-", "_")[:32]
        if "suspects" in body and "detail" not in body:
            body["detail"] = json.dumps(body["suspects"])[:500]
        body.setdefault("report_id", uuid.uuid4().hex)
        if self.update is not None:
            body.setdefault("manifest_digest", self.update.get("manifest_digest"))
        allowed = {"report_id", "state", "manifest_digest", "error", "version", "detail", "serial"}
        self._json("POST", "/v1/reports", {k: v for k, v in body.items() if k in allowed})

    def request_certificate(self, csr_pem: bytes) -> bytes:
        """Certificate renewal: send a CSR over the current identity, get the new certificate
        (PEM, bounded). Not retried on a refusal: the caller decides when to ask again."""
        resp = self._request(
            "POST",
            "/v1/certificate",
            body=csr_pem,
            headers={"Content-Type": "application/pkcs10"},
        )
        if resp.status != 201:
            raise self._error(resp)
        return self._read_bounded(resp, MAX_CERT, "certificate")

    def use_identity(self, cert_pem: bytes, key_pem: bytes) -> None:
        """Present another client identity from the next connection on (certificate
        renewal). The identity files this transport was built from are replaced (the key
        owner-only): they are a copy of the identity in secure storage, which stays the
        device's truth and is exported again at every start."""
        if self._cert_file.exists() and self._cert_file.read_bytes() == cert_pem:
            return
        atomic_write(self._key_file, key_pem, mode=0o600)
        atomic_write(self._cert_file, cert_pem)
        self._ctx = pinned_context(self._ca_file, self._cert_file, self._key_file, self._key_loader)
        self.close()  # an open connection keeps the identity of its handshake

    def keylist(self, etag: str | None = None) -> tuple[bytes, str] | None:
        """The published key-list document and its ETag; None if unchanged since ``etag``."""
        headers = {"If-None-Match": etag} if etag else {}
        resp = self._request("GET", "/v1/keylist", headers=headers)
        if resp.status == 304:
            resp.discard()
            return None
        if resp.status != 200:
            raise self._error(resp)
        etag = resp.header("etag") or ""
        return self._read_bounded(resp, MAX_KEYLIST, "key list"), etag


def _readable(sock: Any) -> bool:
    """Whether an idle socket has something to read (the peer closed it, or sent junk).
    poll(), not select(): descriptors above 1024 are normal in a 14,000-device simulation."""
    if isinstance(sock, ssl.SSLSocket) and sock.pending():
        return True
    p = select.poll()
    p.register(sock, select.POLLIN)
    return bool(p.poll(0))


class _Response:
    """A response with its body unread. Reading it to the end hands the connection back for
    reuse; closing it before the end closes the connection (its unread bytes are garbage to
    the next request), as does a server's ``Connection: close``."""

    __slots__ = ("_clock", "_conn", "_done", "_raw", "status")

    def __init__(self, raw: http.client.HTTPResponse, conn: _Conn, clock: Callable[[], float]):
        self._raw = raw
        self._conn = conn
        self._clock = clock
        self._done = False
        self.status = raw.status

    def header(self, name: str) -> str | None:
        return self._raw.getheader(name)

    def iter_raw(self) -> Iterator[bytes]:
        """The body as it arrives (at most one socket read per chunk), never decoded. A body
        that ends before its declared length raises IncompleteRead (a drop, not an end)."""
        raw = self._raw
        while True:
            if not raw.chunked and raw.length == 0:
                break
            chunk = raw.read1(CHUNK)
            if not chunk:
                if raw.length:  # EOF with declared bytes still missing
                    raise http.client.IncompleteRead(b"", raw.length)
                break
            yield chunk
        self._done = True

    def discard(self) -> None:
        """Throw the body away: read if small (the connection stays usable), else close."""
        raw = self._raw
        length = raw.length
        if not raw.chunked and length is not None and length <= DRAIN_LIMIT:
            try:
                raw.read()
                self._done = True
            except NET_ERRORS:
                pass
        self.close()

    def close(self) -> None:
        raw = self._raw
        complete = self._done or raw.isclosed()
        raw.close()
        if not complete or raw.will_close:
            self._conn.http.close()
        else:
            self._conn.idle_since = self._clock()
