"""The typed client of the update server's admin API: one method per admin endpoint.

Why one module: the CLI, the simulator and the tests used to build admin requests by hand
(paths, query parameters, bodies, error handling), each slightly differently, so a changed
endpoint broke some callers silently. Here every endpoint is one method with typed arguments
and a typed result, and every refusal arrives the same way: :class:`AdminError` carrying the
server's own ``E_*`` code and HTTP status; a server that cannot be reached (or answers something
that is not the admin API) is ``E_TRANSPORT``. Responses are parsed with :func:`wire.loads_json`
(the same strict JSON the server accepts).

It depends only on httpx, :mod:`errors` and :mod:`wire` — never on :mod:`otaguard.server` — so an
operator's workstation or CI runner needs nothing of the server to drive it. Configuration
comes from the environment as everywhere in otaguard: the bearer token from
``$OTAGUARD_ADMIN_TOKEN`` (never a command-line argument: ``ps`` and shell history would show
it), the server URL from ``$OTAGUARD_SERVER``, the admin listener's CA from
``$OTAGUARD_ADMIN_CA`` (the fleet CA, not the system trust store).
"""

from __future__ import annotations

import base64
import os
import ssl
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, Literal, NotRequired, TypedDict, cast

import httpx

from .errors import ErrorCode, OtaError, UsageError
from .wire import loads_json

TOKEN_ENV = "OTAGUARD_ADMIN_TOKEN"
SERVER_ENV = "OTAGUARD_SERVER"
CA_ENV = "OTAGUARD_ADMIN_CA"
DEFAULT_TIMEOUT = httpx.Timeout(30.0, read=300.0)  # an upload is verified before the answer
UPLOAD_CHUNK = 1 << 20

CampaignAction = Literal["start", "pause", "resume", "abort"]


class AdminError(OtaError):
    """The admin API refused a request (``code`` is the server's, ``status`` its HTTP status)
    or could not be reached (``E_TRANSPORT``, status 0)."""

    default_code = ErrorCode.TRANSPORT

    def __init__(self, code: ErrorCode | None = None, detail: str = "", status: int = 0) -> None:
        super().__init__(code, detail)
        self.status = status


# --- result types (the JSON the server sends; docs/server.md) ---------------------------------
class Blob(TypedDict):
    blob: str  # SHA-256 of the bytes, hex: the name the server stores them under
    size: int


class ReleaseCreated(TypedDict):
    id: int
    version: str
    model: str
    hw_rev: str
    manifest_digest: str


class ClassFormat(TypedDict):
    class_id: str
    format: str


class DeltaCreated(TypedDict):
    id: int
    uploaded_by: str
    release_id: int
    base_digest: str
    manifest_digest: str


class Delta(TypedDict):
    id: int
    base_digest: str
    base_version: str | None
    manifest_digest: str
    patch_digest: str
    patch_size: int
    created_at: int


class Release(TypedDict):
    id: int
    model: str
    hw_rev: str
    version: str
    min_version: str | None
    security_counter: int
    sequence_number: int
    expires: int | None
    manifest_digest: str
    image_size: int
    signers: list[str]
    description: str | None
    uploaded_by: str | None
    created_at: int
    deltas: NotRequired[list[Delta]]  # only in :meth:`AdminClient.release`


class Report(TypedDict):
    report_id: str
    state: str
    error_code: str | None
    version: str | None
    detail: str | None
    release_id: int | None
    received_at: int


class DeviceSummary(TypedDict):
    serial: str
    model: str
    hw_rev: str
    groups: list[str]
    revoked: bool
    current_version: str | None
    security_counter: int | None
    keylist_version: int | None
    last_seen: int | None
    last_error: str | None
    suspect: bool


class DeviceAssignment(TypedDict):
    release_id: int
    campaign_id: int | None
    state: str  # assigned / offered / installing / done / failed
    assigned_at: int
    updated_at: int


class Device(DeviceSummary):
    slot_state: dict[str, Any] | None
    running_digest: str | None
    suspect_reason: str | None
    probe_history: list[dict[str, Any]]
    last_report: Report | None
    assignment: DeviceAssignment | None


class DeviceList(TypedDict):
    total: int
    devices: list[DeviceSummary]


class Group(TypedDict):
    name: str
    devices: int


class DeviceGroups(TypedDict):
    serial: str
    groups: list[str]


class DeviceCampaigns(TypedDict):
    serial: str
    campaigns: list[dict[str, Any]]


class Assignment(TypedDict):
    serial: str
    release_id: int


class Revoked(TypedDict):
    serial: str
    revoked: bool


class ExpiringCert(TypedDict):
    serial: str
    cert_not_after: int
    expired: bool
    renewal_pending: bool
    cert_renewed_at: int | None
    last_seen: int | None


class ExpiringCerts(TypedDict):
    within: int  # seconds
    now: int
    devices: list[ExpiringCert]


class KeylistPublished(TypedDict):
    version: int


class Campaign(TypedDict, total=False):
    """A campaign's status (docs/campaigns.md); the fields below are always present."""

    id: str
    name: str | None
    status: str
    release: dict[str, Any]
    phase: int
    phases: Any
    counts: dict[str, int]
    target_size: int
    pause_reason: str | None
    sla: dict[str, Any]
    stragglers: list[str]
    history: list[dict[str, Any]]


class RotationStarted(TypedDict):
    id: int
    state: str


class RotationStep(TypedDict, total=False):
    id: int
    state: str
    forced: bool
    release_kid: str
    keylist_version: int


class KeyExpiry(TypedDict):
    keys: list[dict[str, Any]]
    warnings: list[dict[str, Any]]


class ReleaseKey(TypedDict):
    kid: str | None
    retired: list[str]


# --- the client -----------------------------------------------------------------------------
def _ssl_context(ca_file: Path | None) -> ssl.SSLContext | bool:
    if ca_file is None:
        return True
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(ErrorCode.USAGE, f"admin CA file {ca_file}: {exc}") from None


def _check_url(server: str) -> str:
    parts = urllib.parse.urlsplit(server)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise UsageError(ErrorCode.USAGE, f"admin server URL must be https://host:port: {server!r}")
    return server.rstrip("/")


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(UPLOAD_CHUNK):
            yield chunk


class AdminClient:
    """One admin-API session. Build it with :meth:`connect` (URL, token and CA from arguments
    or the environment) or around an existing ``httpx.Client`` (e.g. Starlette's TestClient
    in tests). Every method is one request; use it as a context manager to close it."""

    def __init__(
        self, http: httpx.Client, *, token: str | None = None, server: str | None = None
    ) -> None:
        self.http = http
        self.server = server or str(http.base_url)
        self._headers = {"Authorization": f"Bearer {token}"} if token is not None else {}

    @classmethod
    def connect(
        cls,
        server: str | None = None,
        *,
        token: str | None = None,
        ca_file: Path | str | None = None,
        timeout: httpx.Timeout | float = DEFAULT_TIMEOUT,
    ) -> AdminClient:
        """A client for ``server`` (default ``$OTAGUARD_SERVER``), authenticated with
        ``token`` (default ``$OTAGUARD_ADMIN_TOKEN``), trusting ``ca_file`` (default
        ``$OTAGUARD_ADMIN_CA``, else the system store). Missing URL: E_USAGE; missing token:
        E_AUTH — both before anything is sent."""
        server = server or os.environ.get(SERVER_ENV)
        if not server:
            raise UsageError(ErrorCode.USAGE, f"--server (or ${SERVER_ENV}) is required")
        url = _check_url(server)
        token = token if token is not None else os.environ.get(TOKEN_ENV)
        if not token:
            raise UsageError(ErrorCode.AUTH, f"set {TOKEN_ENV} to an admin bearer token")
        ca = ca_file if ca_file is not None else os.environ.get(CA_ENV) or None
        http = httpx.Client(
            base_url=url, verify=_ssl_context(Path(ca) if ca else None), timeout=timeout
        )
        return cls(http, token=token, server=url)

    def as_token(self, token: str) -> AdminClient:
        """The same connection, another identity (tests exercising roles)."""
        return AdminClient(self.http, token=token, server=self.server)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- plumbing ---------------------------------------------------------------------------
    def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        content: bytes | Iterator[bytes] | None = None,
        params: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> Any:
        """One request; the decoded JSON answer, or :class:`AdminError`."""
        if params is not None:
            params = {k: v for k, v in params.items() if v is not None}
        try:
            r = self.http.request(
                method,
                path,
                json=json,
                content=content,
                params=params,
                headers={**self._headers, **(headers or {})},
            )
        except httpx.HTTPError as exc:
            why = _line(str(exc) or type(exc).__name__)
            raise AdminError(
                ErrorCode.TRANSPORT, f"cannot reach the admin API at {self.server}: {why}"
            ) from None
        try:
            data = loads_json(r.content)
        except OtaError:
            raise AdminError(
                ErrorCode.TRANSPORT,
                f"{self.server}: HTTP {r.status_code} is not an admin API answer (not JSON)",
                r.status_code,
            ) from None
        if r.status_code >= 400:
            err = data.get("error") if isinstance(data, dict) else None
            detail = data.get("detail", "") if isinstance(data, dict) else ""
            try:
                code = ErrorCode(str(err))
            except ValueError:
                code = ErrorCode.TRANSPORT
            raise AdminError(code, f"HTTP {r.status_code}: {_line(str(detail))}", r.status_code)
        return data

    # --- releases ---------------------------------------------------------------------------
    def upload_blob(self, data: bytes | Path) -> Blob:
        """An image or patch; stored under its SHA-256, so uploading it again is harmless."""
        if isinstance(data, Path):
            size = data.stat().st_size
            body: bytes | Iterator[bytes] = _file_chunks(data)
            headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
        else:
            body, headers = data, {"Content-Type": "application/octet-stream"}
        return cast(Blob, self.request("POST", "/admin/v1/images", content=body, headers=headers))

    def create_release(self, envelope: bytes, image_blob: str) -> ReleaseCreated:
        """Verified by the server on upload (signature, image digest and size, retired keys);
        the same manifest or version twice is E_CONFLICT."""
        out = self.request(
            "POST",
            "/admin/v1/releases",
            params={"image": image_blob},
            content=envelope,
            headers={"Content-Type": "application/suit-envelope+cose"},
        )
        return cast(ReleaseCreated, out)

    def create_delta(
        self, release_id: int, envelope: bytes, patch_blob: str, base_version: str | None = None
    ) -> DeltaCreated:
        out = self.request(
            "POST",
            f"/admin/v1/releases/{int(release_id)}/deltas",
            params={"patch": patch_blob, "base_version": base_version},
            content=envelope,
            headers={"Content-Type": "application/suit-envelope+cose"},
        )
        return cast(DeltaCreated, out)

    def attach_mcuboot(self, release_id: int, image_blob: str) -> dict[str, Any]:
        """Attach an uploaded MCUboot image to a release (verified against the release's
        signers, version and security counter on upload)."""
        out = self.request(
            "POST", f"/admin/v1/releases/{int(release_id)}/mcuboot", params={"image": image_blob}
        )
        return cast(dict[str, Any], out)

    def tuf_online_keys(self) -> dict[str, str]:
        """The server's TUF snapshot and timestamp public keys (PEM), for the root ceremony."""
        return cast(dict[str, str], self.request("GET", "/admin/v1/tuf/online-keys"))

    def put_tuf_root(self, root_json: bytes) -> dict[str, Any]:
        """Publish root metadata (version N+1 must be signed by the old and new roots)."""
        out = self.request(
            "PUT",
            "/admin/v1/tuf/root",
            content=root_json,
            headers={"Content-Type": "application/json"},
        )
        return cast(dict[str, Any], out)

    def put_tuf_targets(self, targets_json: bytes) -> dict[str, Any]:
        """Publish targets metadata (its images uploaded first); the server signs snapshot
        and timestamp."""
        out = self.request(
            "PUT",
            "/admin/v1/tuf/targets",
            content=targets_json,
            headers={"Content-Type": "application/json"},
        )
        return cast(dict[str, Any], out)

    def set_class_format(self, class_id: str, fmt: str) -> ClassFormat:
        """Which image format devices of a class get: ``suit`` (default) or ``mcuboot``."""
        out = self.request(
            "PUT", f"/admin/v1/classes/{_seg(class_id)}/format", json={"format": fmt}
        )
        return cast(ClassFormat, out)

    def list_releases(
        self, *, model: str | None = None, hw_rev: str | None = None
    ) -> list[Release]:
        out = self.request("GET", "/admin/v1/releases", params={"model": model, "hw_rev": hw_rev})
        return cast(list[Release], out["releases"])

    def release(self, release_id: int) -> Release:
        """One release with its deltas (E_NOT_FOUND for an unknown id)."""
        return cast(Release, self.request("GET", f"/admin/v1/releases/{int(release_id)}"))

    def release_key(self) -> ReleaseKey:
        return cast(ReleaseKey, self.request("GET", "/admin/v1/release-key"))

    # --- devices and groups -----------------------------------------------------------------
    def list_devices(
        self,
        *,
        model: str | None = None,
        hw_rev: str | None = None,
        group: str | None = None,
        version: str | None = None,
        suspect: bool | None = None,
        limit: int | None = None,
        offset: int | None = None,
    ) -> DeviceList:
        params = {
            "model": model,
            "hw_rev": hw_rev,
            "group": group,
            "version": version,
            "suspect": None if suspect is None else ("true" if suspect else "false"),
            "limit": limit,
            "offset": offset,
        }
        return cast(DeviceList, self.request("GET", "/admin/v1/devices", params=params))

    def device(self, serial: str) -> Device:
        """One device: what it last reported at check-in, its last status report, probes."""
        return cast(Device, self.request("GET", f"/admin/v1/devices/{_seg(serial)}"))

    def device_campaigns(self, serial: str) -> DeviceCampaigns:
        path = f"/admin/v1/devices/{_seg(serial)}/campaigns"
        return cast(DeviceCampaigns, self.request("GET", path))

    def set_groups(self, serial: str, groups: list[str]) -> DeviceGroups:
        path = f"/admin/v1/devices/{_seg(serial)}/groups"
        return cast(DeviceGroups, self.request("PUT", path, json={"groups": groups}))

    def list_groups(self) -> list[Group]:
        return cast(list[Group], self.request("GET", "/admin/v1/groups")["groups"])

    def assign(self, serial: str, release_id: int) -> Assignment:
        body = {"serial": serial, "release_id": release_id}
        return cast(Assignment, self.request("POST", "/admin/v1/assignments", json=body))

    def expiring_certificates(
        self, within: str = "30d", *, limit: int | None = None
    ) -> ExpiringCerts:
        """Devices whose certificate ends within ``within`` (``30d``, ``12h``, seconds),
        soonest first (``GET /admin/v1/certificates/expiring``, served where certificate
        renewal is built in)."""
        params = {"within": within, "limit": limit}
        out = self.request("GET", "/admin/v1/certificates/expiring", params=params)
        return cast(ExpiringCerts, out)

    def revoke_device(self, serial: str) -> Revoked:
        return cast(Revoked, self.request("POST", f"/admin/v1/devices/{_seg(serial)}/revoke"))

    # --- key lists and rotation -------------------------------------------------------------
    def put_keylist(self, document: bytes) -> KeylistPublished:
        out = self.request(
            "PUT",
            "/admin/v1/keylist",
            content=document,
            headers={"Content-Type": "application/cose"},
        )
        return cast(KeylistPublished, out)

    def start_rotation(
        self,
        keylist: bytes,
        *,
        old_kid: str,
        new_kid: str,
        threshold: float | None = None,
        unreachable_after: int | None = None,
        model: str | None = None,
        hw_rev: str | None = None,
        group: str | None = None,
        reason: str | None = None,
    ) -> RotationStarted:
        body = {
            "keylist": base64.b64encode(keylist).decode(),
            "old_kid": old_kid,
            "new_kid": new_kid,
            "threshold": threshold,
            "unreachable_after": unreachable_after,
            "model": model,
            "hw_rev": hw_rev,
            "group": group,
            "reason": reason,
        }
        body = {k: v for k, v in body.items() if v is not None}
        return cast(RotationStarted, self.request("POST", "/admin/v1/rotations", json=body))

    def rotation(self, rotation_id: int | None = None, *, warn_days: int = 90) -> dict[str, Any]:
        """Rotation status (docs/operations.md); the latest when ``rotation_id`` is None."""
        which = "current" if rotation_id is None else str(int(rotation_id))
        out = self.request("GET", f"/admin/v1/rotations/{which}", params={"warn_days": warn_days})
        return cast(dict[str, Any], out)

    def advance_rotation(
        self, rotation_id: int, *, force: bool = False, reason: str | None = None
    ) -> RotationStep:
        body = {"force": force, "reason": reason}
        path = f"/admin/v1/rotations/{int(rotation_id)}/advance"
        return cast(RotationStep, self.request("POST", path, json=body))

    def finish_rotation(
        self, rotation_id: int, keylist: bytes, *, force: bool = False, reason: str | None = None
    ) -> RotationStep:
        body = {"keylist": base64.b64encode(keylist).decode(), "force": force, "reason": reason}
        path = f"/admin/v1/rotations/{int(rotation_id)}/finish"
        return cast(RotationStep, self.request("POST", path, json=body))

    def key_expiry(self, *, warn_days: int = 90) -> KeyExpiry:
        out = self.request("GET", "/admin/v1/keys/expiry", params={"warn_days": warn_days})
        return cast(KeyExpiry, out)

    # --- campaigns --------------------------------------------------------------------------
    def create_campaign(self, spec: dict[str, Any]) -> Campaign:
        """A draft campaign from a CampaignCreate body (docs/campaigns.md)."""
        return cast(Campaign, self.request("POST", "/admin/v1/campaigns", json=spec))

    def campaign_action(
        self, name: str, action: CampaignAction, reason: str | None = None
    ) -> Campaign:
        body = {"reason": reason} if reason else None
        path = f"/admin/v1/campaigns/{_seg(name)}/{action}"
        return cast(Campaign, self.request("POST", path, json=body))

    def campaign(self, name: str, *, stale_after: int | None = None) -> Campaign:
        path = f"/admin/v1/campaigns/{_seg(name)}"
        return cast(Campaign, self.request("GET", path, params={"stale_after": stale_after}))

    def list_campaigns(self, status: str | None = None) -> list[Campaign]:
        out = self.request("GET", "/admin/v1/campaigns", params={"status": status})
        return cast(list[Campaign], out["campaigns"])

    def openapi(self) -> dict[str, Any]:
        return cast(dict[str, Any], self.request("GET", "/admin/v1/openapi.json"))


def _line(text: str, limit: int = 300) -> str:
    """One line, bounded: error details end up in ``otaguard: error E_X: ...``."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _seg(value: str) -> str:
    """A path segment: a serial or name with '/' or '?' in it must not change the route."""
    return urllib.parse.quote(value, safe="")
