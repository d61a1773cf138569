"""Device and admin API over real mTLS, on SQLite and PostgreSQL."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import hashlib
import os
import socket
import ssl
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st

from otaguard.adminclient import AdminClient
from otaguard.crypto.algorithms import HashAlg
from otaguard.crypto.software import SoftwareSigner
from otaguard.manifest.build import build_envelope
from otaguard.manifest.ids import class_id, vendor_id
from otaguard.manifest.model import ManifestInfo
from otaguard.server.context import ServerSettings, TrustState
from otaguard.server.device_api.endpoints import parse_range
from otaguard.server.pki.ca import FleetCA
from otaguard.server.ratelimit import RateLimit
from otaguard.server.storage import models, store
from otaguard.server.storage.db import sqlite_url
from otaguard.trust.documents import issue_authorization, sign_keylist
from otaguard.trust.model import Role, Scope, StaticKeys
from otaguard.trust.store import TrustStore
from tests.pg import Harness, db_url, fleet_ca, harness, hx, pg_cluster, server_tls  # noqa: F401

VENDOR = vendor_id("example.com")
SIGNER = SoftwareSigner(ed25519.Ed25519PrivateKey.generate())


def make_release(
    version: str,
    image: bytes,
    *,
    model: str = "gw",
    hw_rev: str = "r1",
    signer: object = SIGNER,
    klass: uuid.UUID | None = None,
) -> bytes:
    info = ManifestInfo(
        sequence_number=int(version.replace(".", "")),
        vendor_id=VENDOR,
        class_id=klass or class_id(VENDOR, model, hw_rev),
        digest_alg=HashAlg.SHA256,
        image_digest=hashlib.sha256(image).digest(),
        image_size=len(image),
        version=version,
        min_version=None,
        security_counter=1,
        expires=None,
        uri=None,
        text={"model": model, "hw_rev": hw_rev},
    )
    return build_envelope(info, [signer])  # type: ignore[list-item]


def admin(h: Harness, role: str) -> httpx.Client:
    with h.db.write() as conn:
        token = store.create_token(conn, f"{role}-{os.urandom(3).hex()}", role)
    c = h.client(None, headers={"Authorization": f"Bearer {token}"})
    return c


def admin_client(h: Harness, role: str) -> AdminClient:
    """The typed admin client (otaguard.adminclient) as ``role``, for tests about the admin
    flow; the raw ``admin`` client stays for tests about the HTTP layer itself."""
    return AdminClient(admin(h, role))


def publish(h: Harness, version: str, image: bytes, **kw: Any) -> int:
    rm = admin_client(h, "release-manager")
    blob = rm.upload_blob(image)["blob"]
    return rm.create_release(make_release(version, image, **kw), blob)["id"]


@pytest.fixture
def hxt(db_url: str, fleet_ca: FleetCA, server_tls: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    with harness(
        db_url, fleet_ca, server_tls, tmp_path, trust=TrustState(StaticKeys([SIGNER.public_key]))
    ) as h:
        yield h


def test_full_device_flow(hxt: Harness) -> None:
    _device_flow(hxt)


def test_full_device_flow_with_inline_io(
    fleet_ca: FleetCA, server_tls: Path, tmp_path: Path
) -> None:
    """The same flow with the database work and blob reads on the event loop (``inline_io``,
    as the simulator runs the server): same answers, ranges and refusals."""
    settings = ServerSettings(
        ca_cert=fleet_ca.cert,
        device_rate=RateLimit(rate=1000.0, burst=1000),
        ip_rate=RateLimit(rate=10000.0, burst=10000),
        inline_io=True,
    )
    with harness(
        sqlite_url(tmp_path / "inline.db"),
        fleet_ca,
        server_tls,
        tmp_path,
        trust=TrustState(StaticKeys([SIGNER.public_key])),
        settings=settings,
    ) as h:
        assert h.srv.settings.inline_io
        _device_flow(h)


def _device_flow(hxt: Harness) -> None:
    image = os.urandom(300_000)
    rid = publish(hxt, "1.1.0", image)
    e = hxt.enroll("SN-10")
    dev = hxt.client(e)
    r = dev.post("/v1/checkin", json={"version": "1.0.0", "security_counter": 1})
    assert r.status_code == 200 and r.json()["update"] is None
    op = admin(hxt, "operator")
    assert (
        op.post("/admin/v1/assignments", json={"serial": "SN-10", "release_id": rid}).status_code
        == 201
    )
    body = {
        "version": "1.0.0",
        "security_counter": 1,
        "keylist_version": 3,
        "slot_state": {"active": "A", "pending": None},
        "running_digest": "ab" * 32,
    }
    upd = dev.post("/v1/checkin", json=body).json()["update"]
    assert upd["version"] == "1.1.0" and upd["image_size"] == len(image)
    env = dev.get(upd["manifest_url"])
    assert env.status_code == 200 and env.headers["content-type"].startswith("application/suit")
    assert (
        dev.get(upd["manifest_url"], headers={"If-None-Match": env.headers["etag"]}).status_code
        == 304
    )
    # Image: full, then a resumed download in two ranges, then If-Range with a stale ETag.
    full = dev.get(upd["image_url"])
    assert full.status_code == 200 and full.content == image
    part1 = dev.get(upd["image_url"], headers={"Range": "bytes=0-99999"})
    assert (
        part1.status_code == 206 and part1.headers["content-range"] == f"bytes 0-99999/{len(image)}"
    )
    part2 = dev.get(
        upd["image_url"], headers={"Range": "bytes=100000-", "If-Range": full.headers["etag"]}
    )
    assert part2.status_code == 206 and part1.content + part2.content == image
    stale = dev.get(upd["image_url"], headers={"Range": "bytes=5-", "If-Range": '"old"'})
    assert stale.status_code == 200 and len(stale.content) == len(image)
    bad = dev.get(upd["image_url"], headers={"Range": f"bytes={len(image)}-"})
    assert bad.status_code == 416 and bad.json()["error"] == "E_RANGE"
    assert bad.headers["content-range"] == f"bytes */{len(image)}"
    # Reports: idempotent by report id.
    rep = {"report_id": "r-1", "state": "installed", "manifest_digest": upd["manifest_digest"]}
    assert dev.post("/v1/reports", json=rep).status_code == 201
    again = dev.post("/v1/reports", json=rep)
    assert again.status_code == 200 and again.json()["duplicate"] is True
    assert (
        dev.post("/v1/reports", json={**rep, "report_id": "r-2", "state": "confirmed"}).status_code
        == 201
    )
    with hxt.db.read() as conn:
        row = store.device_by_serial(conn, "SN-10")
        assert row is not None
        assert store.count_reports(conn, row.id) == 2
        assert row.keylist_version == 3 and row.running_digest == "ab" * 32
    # Confirmed: no more update offered; the device is done.
    r = dev.post("/v1/checkin", json={"version": "1.1.0"})
    assert r.json()["update"] is None
    # Another device cannot fetch an image it was not offered.
    other = hxt.client(hxt.enroll("SN-11"))
    r = other.get(upd["image_url"])
    assert r.status_code == 404 and r.json()["error"] == "E_NOT_FOUND"


def test_release_upload_refusals(hxt: Harness) -> None:
    rm = admin(hxt, "release-manager")
    image = os.urandom(1000)
    blob = rm.post("/admin/v1/images", content=image).json()["blob"]
    # Signed by an unknown key.
    rogue = SoftwareSigner(ed25519.Ed25519PrivateKey.generate())
    r = rm.post(
        "/admin/v1/releases",
        params={"image": blob},
        content=make_release("2.0.0", image, signer=rogue),
    )
    assert r.status_code == 400 and r.json()["error"] == "E_UNTRUSTED_KEY"
    # Not an envelope at all / unsigned bytes.
    r = rm.post("/admin/v1/releases", params={"image": blob}, content=b"\xd8\x6b\xa0")
    assert r.status_code == 400 and r.json()["error"] in {"E_MALFORMED", "E_NO_AUTH"}
    # Tampered envelope: one bit of the image digest inside the signed manifest flipped. The
    # envelope still parses, so the manifest digest check (before any signature) refuses it.
    env = bytearray(make_release("2.0.0", image))
    pos = bytes(env).index(hashlib.sha256(image).digest())
    env[pos] ^= 1
    r = rm.post("/admin/v1/releases", params={"image": blob}, content=bytes(env))
    assert r.status_code == 400 and r.json()["error"] == "E_DIGEST"
    # Image that does not match the signed digest.
    other_blob = rm.post("/admin/v1/images", content=os.urandom(1000)).json()["blob"]
    r = rm.post(
        "/admin/v1/releases", params={"image": other_blob}, content=make_release("2.0.0", image)
    )
    assert r.status_code == 400 and r.json()["error"] == "E_IMAGE_DIGEST"
    # Roles: a viewer may not upload; no token at all is 401.
    r = admin(hxt, "viewer").post("/admin/v1/releases", params={"image": blob}, content=b"x")
    assert r.status_code == 403 and r.json()["error"] == "E_FORBIDDEN"
    r = hxt.client(None).post("/admin/v1/images", content=b"x")
    assert r.status_code == 401 and r.json()["error"] == "E_AUTH"
    # Good one, then the same version again is a conflict.
    assert (
        rm.post(
            "/admin/v1/releases", params={"image": blob}, content=make_release("2.0.0", image)
        ).status_code
        == 201
    )
    r = rm.post("/admin/v1/releases", params={"image": blob}, content=make_release("2.0.0", image))
    assert r.status_code == 409 and r.json()["error"] == "E_CONFLICT"
    with hxt.db.read() as conn:
        assert conn.execute(models.releases.select()).fetchall().__len__() == 1


def test_incompatible_assignment(hxt: Harness) -> None:
    rid = publish(hxt, "1.0.1", b"abc", model="cam", hw_rev="r9")
    hxt.enroll("SN-20")
    r = admin(hxt, "operator").post(
        "/admin/v1/assignments", json={"serial": "SN-20", "release_id": rid}
    )
    assert r.status_code == 409 and r.json()["error"] == "E_INCOMPATIBLE"


def test_bad_input(hx: Harness) -> None:
    dev = hx.client(hx.enroll("SN-30"))
    hx.enroll("SN-31")
    r = dev.post("/v1/checkin", json={"version": "1.0.0", "serial": "SN-31"})
    assert r.status_code == 403 and r.json()["error"] == "E_IDENTITY"
    r = dev.post("/v1/reports", json={"report_id": "x", "state": "failed", "serial": "SN-31"})
    assert r.status_code == 403 and r.json()["error"] == "E_IDENTITY"
    r = dev.post("/v1/checkin", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"] == "E_MALFORMED"
    r = dev.post("/v1/checkin", json={"version": "1.0.0", "security_counter": -1})
    assert r.status_code == 400 and r.json()["error"] == "E_MALFORMED"
    r = dev.post("/v1/reports", json={"report_id": "a b", "state": "failed"})
    assert r.status_code == 400 and r.json()["error"] == "E_MALFORMED"
    r = dev.post(
        "/v1/checkin", content=b"[" * 100_000, headers={"content-type": "application/json"}
    )
    assert r.status_code == 413 and r.json()["error"] == "E_TOO_LARGE"
    r = dev.get("/v1/keylist")
    assert r.status_code == 404 and r.json()["error"] == "E_NOT_FOUND"
    with hx.db.read() as conn:
        row = store.device_by_serial(conn, "SN-31")
        assert row is not None and row.last_seen is None and store.count_reports(conn) == 0


def test_keylist_etag(hx: Harness) -> None:
    with hx.db.write() as conn:
        store.put_keylist(conn, 4, b"signed-keylist-document-v4")
    dev = hx.client(hx.enroll("SN-40"))
    r = dev.get("/v1/keylist")
    assert r.status_code == 200 and r.content == b"signed-keylist-document-v4"
    assert r.headers["x-keylist-version"] == "4"
    r2 = dev.get("/v1/keylist", headers={"If-None-Match": r.headers["etag"]})
    assert r2.status_code == 304 and r2.content == b""
    assert dev.post("/v1/checkin", json={"version": "1.0.0"}).json()["keylist_version"] == 4


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_rate_limit_and_probe_flag(
    db_url: str, fleet_ca: FleetCA, server_tls: Path, tmp_path: Path
) -> None:
    s = ServerSettings(
        ca_cert=fleet_ca.cert,
        device_rate=RateLimit(rate=0.5, burst=3),
        probe_threshold=5,
        probe_event_interval=0.0,
    )
    with harness(db_url, fleet_ca, server_tls, tmp_path, settings=s) as h:
        dev = h.client(h.enroll("SN-50"))
        quiet = h.client(h.enroll("SN-51"))
        codes = [dev.post("/v1/checkin", json={"version": "1.0.0"}) for _ in range(10)]
        assert [c.status_code for c in codes[:3]] == [200, 200, 200]
        limited = codes[3:]
        assert all(c.status_code == 429 for c in limited)
        assert limited[0].json()["error"] == "E_RATE_LIMIT"
        assert int(limited[0].headers["retry-after"]) >= 1
        # Per device: another device is unaffected.
        assert quiet.post("/v1/checkin", json={"version": "1.0.0"}).status_code == 200
        with h.db.read() as conn:
            row = store.device_by_serial(conn, "SN-50")
            assert row is not None and row.suspect and "probe" in row.suspect_reason
            hist = store.probe_history(conn, row.id)
            assert len(hist) == 7 and {p["kind"] for p in hist} == {"rate_limit"}
            q = store.device_by_serial(conn, "SN-51")
            assert q is not None and not q.suspect
        view = admin(h, "viewer").get("/admin/v1/devices/SN-50").json()
        assert view["suspect"] is True and len(view["probe_history"]) == 7


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_ip_rate_limit_before_auth(
    db_url: str, fleet_ca: FleetCA, server_tls: Path, tmp_path: Path
) -> None:
    s = ServerSettings(ca_cert=fleet_ca.cert, ip_rate=RateLimit(rate=0.1, burst=2))
    with harness(sqlite_url(tmp_path / "x.db"), fleet_ca, server_tls, tmp_path, settings=s) as h:
        c = h.client(None)  # no admin token: would be 401, but the IP limit comes first
        codes = [c.get("/admin/v1/devices/x").status_code for _ in range(4)]
        assert codes == [401, 401, 429, 429]


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30), st.integers(min_value=0, max_value=10_000))
def test_parse_range_properties(header: str, size: int) -> None:
    out = parse_range(header, size)
    if isinstance(out, tuple):
        start, end = out
        assert 0 <= start <= end < size


@pytest.mark.parametrize(
    ("header", "size", "want"),
    [
        ("bytes=0-9", 100, (0, 9)),
        ("bytes=90-", 100, (90, 99)),
        ("bytes=-10", 100, (90, 99)),
        ("bytes=-1000", 100, (0, 99)),
        ("bytes=50-1000", 100, (50, 99)),
        ("bytes=100-", 100, "unsatisfiable"),
        ("bytes=-0", 100, "unsatisfiable"),
        ("bytes=9-1", 100, None),
        ("bytes=0-1,5-6", 100, None),
        ("items=0-1", 100, None),
        ("bytes=a-b", 100, None),
    ],
)
def test_parse_range_cases(header: str, size: int, want: object) -> None:
    assert parse_range(header, size) == want


def test_transient_failure_keeps_direct_assignment_open(hxt: Harness) -> None:
    """A dropped download is retried by the device; a final refusal ends the assignment."""
    rid = publish(hxt, "1.1.0", os.urandom(4096))
    dev = hxt.client(hxt.enroll("SN-40"))
    assert dev.post("/v1/checkin", json={"version": "1.0.0"}).status_code == 200
    op = admin(hxt, "operator")
    assert (
        op.post("/admin/v1/assignments", json={"serial": "SN-40", "release_id": rid}).status_code
        == 201
    )
    upd = dev.post("/v1/checkin", json={"version": "1.0.0"}).json()["update"]
    rep = {"state": "failed", "manifest_digest": upd["manifest_digest"]}
    r = dev.post("/v1/reports", json={**rep, "report_id": "f-1", "error": "E_TRANSPORT"})
    assert r.status_code == 201
    again = dev.post("/v1/checkin", json={"version": "1.0.0"}).json()["update"]
    assert again is not None and again["release_id"] == upd["release_id"]
    r = dev.post("/v1/reports", json={**rep, "report_id": "f-2", "error": "E_IMAGE_DIGEST"})
    assert r.status_code == 201
    assert dev.post("/v1/checkin", json={"version": "1.0.0"}).json()["update"] is None


# --- G12: upload checks ----------------------------------------------------------------------
MAX_IMAGE = 64 * 1024


@pytest.fixture
def small(fleet_ca: FleetCA, server_tls: Path, tmp_path: Path) -> Iterator[Harness]:
    """SQLite server with a 64 KiB image limit (the limit is not database-specific)."""
    s = ServerSettings(
        ca_cert=fleet_ca.cert,
        max_image=MAX_IMAGE,
        device_rate=RateLimit(rate=1000.0, burst=1000),
        ip_rate=RateLimit(rate=10000.0, burst=10000),
    )
    trust = TrustState(StaticKeys([SIGNER.public_key]))
    url = sqlite_url(tmp_path / "small.db")
    with harness(url, fleet_ca, server_tls, tmp_path, settings=s, trust=trust) as h:
        yield h


def _raw_admin_request(h: Harness, head: bytes) -> bytes:
    """Send only ``head`` (request line + headers, no body) over TLS; return what comes back."""
    assert h.admin_server is not None
    ctx = ssl.create_default_context(cafile=str(h.tmp / "tls" / "ca.pem"))
    port = int(h.admin_server.url.rsplit(":", 1)[1].rstrip("/"))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        tls.sendall(head)
        out = b""
        while b"\r\n\r\n" not in out or b'"error"' not in out:
            chunk = tls.recv(4096)
            if not chunk:
                break
            out += chunk
        return out


def test_image_upload_size_limit(small: Harness) -> None:
    rm = admin(small, "release-manager")
    blobs = small.tmp / "blobs"
    at_limit = os.urandom(MAX_IMAGE)
    r = rm.post("/admin/v1/images", content=at_limit)
    assert r.status_code == 201 and r.json()["size"] == MAX_IMAGE
    over = os.urandom(MAX_IMAGE + 1)
    # Declared length over the limit: refused from the header.
    r = rm.post("/admin/v1/images", content=over)
    assert r.status_code == 413 and r.json()["error"] == "E_TOO_LARGE"

    # Chunked (no Content-Length): refused while streaming, and nothing is committed.
    def chunks() -> Iterator[bytes]:
        for i in range(0, len(over), 4096):
            yield over[i : i + 4096]

    r = rm.post("/admin/v1/images", content=chunks())
    assert r.status_code == 413 and r.json()["error"] == "E_TOO_LARGE"
    assert not small.srv.blobs.path(hashlib.sha256(over).hexdigest()).exists()
    names = {p.name for p in blobs.rglob("*") if p.is_file() and len(p.name) == 64}
    assert names == {hashlib.sha256(at_limit).hexdigest()}
    # A huge declared length is refused before a single body byte is sent: the client below
    # never sends one, so a server that read (or waited for) the body could not answer 413 at
    # all — the answer arriving is the proof, no stopwatch needed.
    with small.db.write() as conn:
        token = store.create_token(conn, "rm-raw", "release-manager")
    resp = _raw_admin_request(
        small,
        b"POST /admin/v1/images HTTP/1.1\r\nHost: localhost\r\n"
        + f"Authorization: Bearer {token}\r\n".encode()
        + f"Content-Length: {1 << 40}\r\n\r\n".encode(),
    )
    assert resp.startswith(b"HTTP/1.1 413") and b'"E_TOO_LARGE"' in resp, resp[:200]


def test_release_class_id_must_match_model_text(small: Harness) -> None:
    rm = admin(small, "release-manager")
    image = os.urandom(1000)
    blob = rm.post("/admin/v1/images", content=image).json()["blob"]
    # Correctly signed, but the class-id is another product's than the text says ("gw"/"r1").
    env = make_release("2.0.0", image, klass=class_id(VENDOR, "cam", "r9"))
    r = rm.post("/admin/v1/releases", params={"image": blob}, content=env)
    assert r.status_code == 400 and r.json()["error"] == "E_CLASS_ID"
    env = make_release("2.0.0", image, klass=class_id(VENDOR, "gw", "r2"))
    r = rm.post("/admin/v1/releases", params={"image": blob}, content=env)
    assert r.status_code == 400 and r.json()["error"] == "E_CLASS_ID"
    with small.db.read() as conn:
        assert conn.execute(models.releases.select()).fetchall() == []
    ok = rm.post("/admin/v1/releases", params={"image": blob}, content=make_release("2.0.0", image))
    assert ok.status_code == 201, ok.text


# --- G11: key-list publication -----------------------------------------------------------------
def _key() -> SoftwareSigner:
    return SoftwareSigner(ed25519.Ed25519PrivateKey.generate())


def test_keylist_publication_refusals(
    db_url: str, fleet_ca: FleetCA, server_tls: Path, tmp_path: Path
) -> None:
    now = int(time.time())
    root, op, fw_only, rogue = _key(), _key(), _key(), _key()

    def auth(k: SoftwareSigner, *roles: Role) -> bytes:
        return issue_authorization(
            root,
            k.public_key,
            roles=frozenset(roles),
            scopes=[Scope(VENDOR)],
            not_before=now - 86400,
            not_after=now + 300 * 86400,
        )

    auths = [auth(op, Role.FIRMWARE, Role.KEYLIST), auth(fw_only, Role.FIRMWARE)]

    def keylist(version: int, by: SoftwareSigner = root) -> bytes:
        return sign_keylist(by, version=version, authorizations=auths, issued_at=now + version)

    v1 = keylist(1)
    trust = TrustState(TrustStore.create(root.public_key, v1))
    with harness(db_url, fleet_ca, server_tls, tmp_path, trust=trust) as h:
        officer = admin(h, "security-officer")
        v2 = keylist(2)
        r = officer.put("/admin/v1/keylist", content=v2)
        assert r.status_code == 201 and r.json()["version"] == 2
        v3 = keylist(3)
        # Replay: the same version again, or an older one.
        for old in (v2, v1):
            r = officer.put("/admin/v1/keylist", content=old)
            assert r.status_code == 409 and r.json()["error"] == "E_REPLAY"
        # Forged: one bit of the root's signature flipped.
        forged = bytearray(v3)
        forged[-5] ^= 0x01
        r = officer.put("/admin/v1/keylist", content=bytes(forged))
        assert r.status_code == 400 and r.json()["error"] == "E_SIGNATURE"
        # Signed by a key nobody trusts, and by a trusted key without the keylist role.
        r = officer.put("/admin/v1/keylist", content=keylist(3, by=rogue))
        assert r.status_code == 400 and r.json()["error"] == "E_UNTRUSTED_KEY"
        r = officer.put("/admin/v1/keylist", content=keylist(3, by=fw_only))
        assert r.status_code == 400 and r.json()["error"] == "E_KEY_ROLE"
        # Roles: only a security officer publishes key lists (a genuine v3 here).
        for role in ("viewer", "operator", "release-manager"):
            r = admin(h, role).put("/admin/v1/keylist", content=v3)
            assert r.status_code == 403 and r.json()["error"] == "E_FORBIDDEN", role
        r = h.client(None).put("/admin/v1/keylist", content=v3)
        assert r.status_code == 401 and r.json()["error"] == "E_AUTH"
        # Nothing refused was published: devices and the release checker still see v2.
        dev = h.client(h.enroll("SN-70"))
        got = dev.get("/v1/keylist")
        assert got.status_code == 200 and got.content == v2
        assert got.headers["x-keylist-version"] == "2"
        resolver = h.srv.trust.resolver
        assert isinstance(resolver, TrustStore) and resolver.version == 2
        # The genuine v3 the refused callers sent is accepted from the right role.
        r = officer.put("/admin/v1/keylist", content=v3)
        assert r.status_code == 201 and r.json()["version"] == 3
        assert dev.get("/v1/keylist").content == v3
