"""The web dashboard over real TLS (httpx as the browser): sessions, anti-forgery tokens, roles,
escaping of stored text, and the security headers of every page. The browser itself is
driven in test_dashboard_browser.py."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from otaguard.errors import ErrorCode, OtaError
from otaguard.server.dashboard.routes import CSP
from otaguard.server.dashboard.session import COOKIE, SESSION_S, sessions_of
from otaguard.server.pki.ca import FleetCA
from otaguard.server.storage import store
from tests.dashboard_support import Scene, csrf_of, login, scene
from tests.pg import db_url, fleet_ca, pg_cluster, server_tls  # noqa: F401

XSS = '<script>window.__pwned=1</script><img src=x onerror="window.__pwned=2">'
PAGES = ["/ui/", "/ui/fleet", "/ui/fleet?serial=SN-00", "/ui/devices/SN-000", "/ui/campaigns",
         "/ui/campaigns/spring-1", "/ui/campaigns/spring-1/live", "/ui/rotation",
         "/ui/rotation/live", "/ui/releases", "/ui/audit"]  # fmt: skip


@pytest.fixture
def sc(
    fleet_ca: FleetCA, server_tls: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Scene]:
    with scene(fleet_ca, server_tls, tmp_path, monkeypatch, devices=4) as s:
        s.campaign("spring-1", display="Spring patch")
        yield s


def refused(r: httpx.Response, status: int, code: str) -> None:
    assert (r.status_code, r.headers.get("x-otaguard-error")) == (status, code), r.text[:400]
    assert code in r.text
    assert r.headers["content-security-policy"] == CSP


def campaign_status(sc: Scene, name: str = "spring-1") -> str:
    r = sc.api("viewer").get(f"/admin/v1/campaigns/{name}")
    return str(r.json()["status"])


@pytest.fixture
def sc_db(
    db_url: str,
    fleet_ca: FleetCA,
    server_tls: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[Scene]:
    with scene(fleet_ca, server_tls, tmp_path, monkeypatch, devices=4, db_url=db_url) as s:
        s.campaign("spring-1", display="Spring patch")
        yield s


def test_every_page_renders_with_the_security_headers(sc_db: Scene) -> None:
    """On SQLite and PostgreSQL: the dashboard's own queries run on both."""
    sc = sc_db
    sc.fleet.poll_all()  # two canaries update: reports, a chart with points
    sc.start_rotation()
    c = sc.login("viewer")
    cookie = c.cookies.get(COOKIE)
    assert cookie is not None and sc.token("viewer") not in cookie  # the token never leaves
    for path in [*PAGES, "/ui/static/dashboard.css", "/ui/static/dashboard.js", "/ui/login"]:
        r = c.get(path)
        assert r.status_code == 200, (path, r.text[:300])
        h = r.headers
        assert h["content-security-policy"] == CSP, path
        assert h["x-content-type-options"] == "nosniff"
        assert h["referrer-policy"] == "no-referrer"
        assert h["cache-control"] == "no-store"
        assert h["x-frame-options"] == "DENY"
    page = c.get("/ui/campaigns/spring-1").text
    assert "Spring patch" in page and "<svg" in page and "<polyline" in page
    assert 'id="pause"' not in page  # a viewer is offered no button
    assert "SN-000" in c.get("/ui/fleet").text
    rot = c.get("/ui/rotation").text
    assert "started" in rot and "threshold" in rot
    audit = c.get("/ui/audit").text
    assert 'id="audit-status" class="ok-text">Verified' in audit and "rotation-start" in audit
    assert c.get("/ui/fleet?serial=SN-000").headers["location"] == "/ui/devices/SN-000"
    assert c.get("/ui/static/other.js").status_code == 404
    refused(c.get("/ui/campaigns/no-such"), 404, "E_NOT_FOUND")
    refused(c.get("/ui/devices/SN-999"), 404, "E_NOT_FOUND")
    r = c.get("/ui")
    assert r.status_code == 307 and r.headers["location"].endswith("/ui/")


def test_login_cookie_attributes_and_refusals(sc: Scene) -> None:
    c = sc.browser()
    page = c.get("/ui/login")
    r = c.post("/ui/login", data={"token": sc.token("viewer"), "csrf": csrf_of(page.text)})
    assert r.status_code == 303 and r.headers["location"] == "/ui/"
    set_cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and COOKIE in v)
    attrs = {a.strip().lower() for a in set_cookie.split(";")}
    assert {"secure", "httponly", "samesite=strict", "path=/"} <= attrs
    refused(login(sc.browser(), "otg_not-a-token"), 401, "E_AUTH")
    # the log-in form's own anti-forgery token: missing, wrong, or without its cookie
    b = sc.browser()
    b.get("/ui/login")
    refused(b.post("/ui/login", data={"token": sc.token("viewer")}), 403, "E_CSRF")
    refused(b.post("/ui/login", data={"token": sc.token("viewer"), "csrf": "x"}), 403, "E_CSRF")
    stranger = sc.browser()
    r = stranger.post("/ui/login", data={"token": sc.token("viewer"), "csrf": csrf_of(page.text)})
    refused(r, 403, "E_CSRF")
    r = b.post("/ui/login", json={"token": sc.token("viewer")})
    refused(r, 403, "E_CSRF")


def test_no_forged_or_expired_session(sc: Scene) -> None:
    anon = sc.browser()
    r = anon.get("/ui/campaigns")
    refused(r, 401, "E_AUTH")
    assert 'action="/ui/login"' in r.text  # the refusal is the log-in page
    c = sc.login("operator")
    good = c.cookies[COOKIE]
    body, mac = good.split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    claims["r"] = "security-officer"  # promote myself; the signature no longer matches
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    for bad in (f"{forged}.{mac}", "garbage", f"{body}.{'A' * len(mac)}", good + "x"):
        f = sc.browser()
        f.cookies.set(COOKIE, bad)
        refused(f.get("/ui/"), 401, "E_AUTH")
    assert c.get("/ui/").status_code == 200
    sessions = sessions_of(sc.h.srv)
    sessions.clock = lambda: time.time() + SESSION_S + 1
    r = c.get("/ui/")
    refused(r, 401, "E_AUTH")
    assert "session expired" in r.text


def test_token_revoked_or_expired_ends_its_sessions(sc: Scene) -> None:
    c = sc.login("operator")
    name = next(t["name"] for t in _tokens(sc) if t["role"] == "operator")
    with sc.h.db.write() as conn:
        store.revoke_token(conn, name)
    refused(c.get("/ui/"), 401, "E_AUTH")
    v = sc.login("viewer")
    assert v.get("/ui/").status_code == 200
    sc.clock.advance(store.DEFAULT_TOKEN_LIFETIME + 1)  # server clock past the token's expiry
    r = v.get("/ui/fleet")
    refused(r, 401, "E_AUTH")
    assert "token expired" in r.text


def _tokens(sc: Scene) -> list[dict[str, object]]:
    with sc.h.db.read() as conn:
        return store.list_tokens(conn)


def test_campaign_actions_need_the_form_token_and_the_role(sc: Scene) -> None:
    op = sc.login("operator")
    page = op.get("/ui/campaigns/spring-1").text
    assert 'id="pause"' in page and 'id="abort"' in page
    token = csrf_of(page)
    url = "/ui/campaigns/spring-1/pause"
    refused(op.post(url, data={}), 403, "E_CSRF")
    refused(op.post(url, data={"csrf": "forged"}), 403, "E_CSRF")
    other = sc.login("security-officer")  # a token from someone else's session
    refused(op.post(url, data={"csrf": csrf_of(other.get("/ui/").text)}), 403, "E_CSRF")
    evil = {"origin": "https://evil.example"}
    refused(op.post(url, data={"csrf": token}, headers=evil), 403, "E_CSRF")
    cross = {"sec-fetch-site": "cross-site"}
    refused(op.post(url, data={"csrf": token}, headers=cross), 403, "E_CSRF")
    assert campaign_status(sc) == "running"  # nothing changed
    viewer = sc.login("viewer")
    vt = csrf_of(viewer.get("/ui/").text)
    refused(viewer.post(url, data={"csrf": vt}), 403, "E_FORBIDDEN")
    refused(viewer.post("/ui/campaigns/spring-1/abort", data={"csrf": vt}), 403, "E_FORBIDDEN")
    assert campaign_status(sc) == "running"
    refused(op.post("/ui/campaigns/spring-1/explode", data={"csrf": token}), 404, "E_NOT_FOUND")
    r = op.post(url, data={"csrf": token, "reason": "r" * 201})
    refused(r, 400, "E_MALFORMED")
    r = op.post(url, data={"csrf": token, "reason": "waiting for the lab"})
    assert r.status_code == 303 and r.headers["location"] == "/ui/campaigns/spring-1"
    assert campaign_status(sc) == "paused"
    page = op.get("/ui/campaigns/spring-1").text
    assert "waiting for the lab" in page and 'id="resume"' in page
    refused(op.post(url, data={"csrf": token}), 409, "E_CAMPAIGN_STATE")  # already paused
    assert op.post("/ui/campaigns/spring-1/resume", data={"csrf": token}).status_code == 303
    assert campaign_status(sc) == "running"
    # log out: the same cookie is refused afterwards, even though it is still signed
    old = op.cookies[COOKIE]
    assert op.post("/ui/logout", data={"csrf": token}).status_code == 303
    replay = sc.browser()
    replay.cookies.set(COOKIE, old)
    refused(replay.get("/ui/"), 401, "E_AUTH")


def test_stored_html_is_escaped(
    fleet_ca: FleetCA, server_tls: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with scene(fleet_ca, server_tls, tmp_path, monkeypatch, devices=2) as s:
        s.campaign("xss-1", display=XSS)
        dev = s.fleet.devices["SN-000"]
        dev.updater.transport.report(
            {"state": "failed", "error": "E_SELF_TEST", "detail": XSS, "version": "1.0.0"}
        )
        op = s.api("operator")
        assert op.post("/admin/v1/campaigns/xss-1/pause", json={"reason": XSS}).status_code == 200
        c = s.login("viewer")
        for path in ("/ui/", "/ui/campaigns", "/ui/campaigns/xss-1", "/ui/devices/SN-000"):
            page = c.get(path).text
            assert "<script>window" not in page and "<img src=x" not in page, path
            assert "&lt;script&gt;window.__pwned=1&lt;/script&gt;" in page, path
        r = c.get("/ui/devices/%3Cscript%3Ealert(1)%3Cb%3E")
        refused(r, 404, "E_NOT_FOUND")
        assert "<script>alert" not in r.text
        r = c.get("/ui/fleet?serial=%3Cscript%3E")
        assert r.status_code == 200 and "<script>" not in r.text.split("</header>")[1]


def test_audit_page_reports_a_tampered_rotation_log(sc: Scene) -> None:
    sc.start_rotation()
    c = sc.login("security-officer")
    assert 'id="audit-status" class="ok-text">Verified' in c.get("/ui/audit").text
    from otaguard.server.admin_api.rotation import close_audit_log

    close_audit_log(sc.h.srv)  # the server reopens it on its next append
    log = sc.h.tmp / "audit" / "rotation-audit.log"
    text = log.read_text()
    assert "INC-42" in text
    log.write_text(text.replace("INC-42", "INC-43"))  # someone rewrites the reason
    page = c.get("/ui/audit").text
    assert 'id="audit-status" class="error">NOT VALID' in page and "E_AUDIT_CHAIN" in page
    lines = text.splitlines(keepends=True)
    log.write_text("".join(lines[:1]))  # cut back before the record the database anchors
    page = c.get("/ui/audit").text
    assert 'class="error">NOT VALID: <code>E_AUDIT_SEAL</code>' in page and "truncated" in page


def test_rotation_finish_shows_on_the_rotation_and_release_pages(sc: Scene) -> None:
    key_b = sc.start_rotation()
    so = sc.api("security-officer")
    force = {"force": True, "reason": "INC-42: ship today"}
    assert so.post("/admin/v1/rotations/1/advance", json=force).status_code == 200
    c = sc.login("viewer")
    page = c.get("/ui/releases").text
    assert 'class="status paused">retired' in page  # 1.1.0 was signed with the old key
    final = sc.lab.keylist_update([key_b], keep_op=False, revoked=[sc.lab.op.public_key.key_id])
    body = {"keylist": base64.b64encode(final).decode(), **force}
    assert so.post("/admin/v1/rotations/1/finish", json=body).status_code == 200
    page = c.get("/ui/releases").text
    assert 'class="status aborted">revoked' in page
    rot = c.get("/ui/rotation").text
    assert 'id="rot-state" class="status finished">finished' in rot
    assert rot.count("INC-42: ship today") == 2  # the forced advance and finish, with reasons


def test_signing_audit_log_says_who_asked_for_each_release(sc: Scene) -> None:
    from otaguard.crypto.software import SoftwareSigner, generate_private_key
    from otaguard.server.dashboard.audit import configure_signing_audit
    from otaguard.signing.audit import AuditLog
    from tests.campaign_fleet import release

    c = sc.login("viewer")
    assert "Not configured" in c.get("/ui/audit").text
    rels = sc.api("viewer").get("/admin/v1/releases").json()["releases"]
    sealer = SoftwareSigner(generate_private_key("ed25519"))
    path = sc.h.tmp / "signing-audit.log"
    log = AuditLog.open(path, sealer, seal_every=1)
    log.append("ci-pipeline", "sign-manifest", {"manifest_digest": rels[0]["manifest_digest"]})
    log.close()
    configure_signing_audit(sc.h.srv, path, [sealer.public_key])
    page = c.get("/ui/releases").text
    assert "ci-pipeline" in page and "no signing record" not in page
    audit = c.get("/ui/audit").text
    assert 'id="signing-status" class="ok-text">Verified' in audit
    assert "Every release on this server has its signing record" in audit
    release(sc.api("release-manager"), sc.lab, "1.2.0", 3)  # signed outside the service
    assert "no signing record" in c.get("/ui/releases").text
    assert (
        'id="unaccounted">Releases with no signing record in this log: #2'
        in c.get("/ui/audit").text
    )
    text = path.read_text()
    path.write_text(text.replace("ci-pipeline", "someone-else"))  # the requester rewritten
    audit = c.get("/ui/audit").text
    assert 'id="signing-status" class="error">NOT VALID: <code>E_AUDIT_CHAIN</code>' in audit
    assert "Signature asked by" not in c.get("/ui/releases").text  # unverified: not shown
    configure_signing_audit(sc.h.srv, path, [])  # without the seal key: seals do not verify
    path.write_text(text)
    assert "NOT VALID: <code>E_AUDIT_SEAL</code>" in c.get("/ui/audit").text


def test_signing_audit_options(tmp_path: Path) -> None:
    from otaguard.server.config import parse_server_config

    doc = {"audit": {"signing_log": "a/audit.log", "signing_keys": ["seal.pem"]}}
    values = parse_server_config(doc, tmp_path)
    assert values == {
        "signing_audit_log": tmp_path / "a/audit.log",
        "signing_audit_keys": [tmp_path / "seal.pem"],
    }
    with pytest.raises(OtaError) as bad:
        parse_server_config({"audit": {"signing_keys": "seal.pem"}}, tmp_path)
    assert bad.value.code == ErrorCode.CONFIG and "audit.signing_keys" in bad.value.detail
    from otaguard.server.runtime import RunOptions, build_server

    opts = RunOptions(tmp_path / "d", tmp_path / "ca.pem", signing_audit_keys=[tmp_path / "k"])
    with pytest.raises(OtaError) as usage:
        build_server(opts)
    assert usage.value.code == ErrorCode.USAGE and not (tmp_path / "d").exists()
