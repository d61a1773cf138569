"""The operators' web dashboard on the admin listener (``/ui/``): fleet, campaigns, key
rotation, releases and audit, as server-rendered HTML.

Same listener, TLS and tokens as the admin API: a person logs in with an admin token once and
gets a signed session cookie (:mod:`.session`); every page re-checks that token on the server
clock. Pages read through the API's own query and service functions, and the campaign buttons
call the same :meth:`CampaignService.transition` after the same role decision
(:func:`..admin_auth.check_role` with ``admin.PERMISSIONS``), so the browser can do nothing the
token could not do through the API. Every response carries a strict Content-Security-Policy:
no inline script or style, nothing from another origin.
"""

from __future__ import annotations

import logging
import threading
import urllib.parse
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import TYPE_CHECKING, Any

import jinja2
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, RedirectResponse, Response
from starlette.routing import BaseRoute, Mount, Route

from ...errors import ErrorCode, OtaError, ServerError
from ...trust.store import TrustStore
from ...wire import decimal
from ..admin_api.auth import PERMISSIONS, check_role
from ..admin_api.campaigns import ACTIONS, check_reason
from ..admin_api.rotation import (
    DEFAULT_WARN_DAYS,
    current_rotation,
    release_key,
    rotation_view,
    targeted,
)
from ..storage import admin_queries as q
from ..storage import store
from . import charts
from . import queries as dq
from .audit import rotation_audit, signing_audit
from .csrf import checked_form, read_form, same_origin
from .session import (
    COOKIE,
    LOGIN_COOKIE,
    LOGIN_S,
    Session,
    end_session,
    session_live,
    sessions_of,
    token_id_of,
)

if TYPE_CHECKING:
    from ..context import ServerContext

log = logging.getLogger("otaguard.server")
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Strict-Transport-Security": "max-age=31536000",
}
STATIC = {"dashboard.css": "text/css; charset=utf-8", "dashboard.js": "text/javascript"}
POLL_MS = 2000
MAX_TOKEN = 200
MAX_SAMPLES = 500
Page = Callable[[Request, Session], Awaitable[Response]]


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("otaguard.server.dashboard", "templates"),
        autoescape=True,  # every template, whatever its name: stored text is escaped
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["when"] = _when
    env.filters["pct"] = lambda v: "–" if v is None else f"{float(v):.1%}"
    env.filters["seg"] = lambda v: urllib.parse.quote(str(v), safe="")  # one path segment
    return env


def _when(t: float | None) -> str:
    import datetime as dt

    if t is None:
        return "never"
    return dt.datetime.fromtimestamp(float(t), dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _status_of(err: OtaError) -> int:
    """The HTTP status the admin API gives the same refusal (ServerError carries it)."""
    if isinstance(err, ServerError):
        return err.status
    return _STATUS.get(err.code, 400)


_STATUS = {ErrorCode.NOT_FOUND: 404, ErrorCode.AUTH: 401, ErrorCode.FORBIDDEN: 403}


class Dashboard:
    def __init__(self, srv: ServerContext) -> None:
        self.srv = srv
        self.sessions = sessions_of(srv)
        self.env = _env()
        # Key-list spread sampled whenever a rotation page is drawn: its "over time" chart.
        self._spread: dict[int, list[tuple[int, dict[int, int]]]] = {}
        self._lock = threading.Lock()

    # --- plumbing ------------------------------------------------------------------------------
    def render(
        self, request: Request, name: str, s: Session | None, status: int = 200, **ctx: Any
    ) -> Response:
        html = self.env.get_template(name).render(
            session=s,
            csrf=self.sessions.csrf(s) if s is not None else "",
            allowed=(lambda perm: _allowed(s, perm)),
            path=request.url.path,
            poll_ms=POLL_MS,
            **ctx,
        )
        return HTMLResponse(html, status_code=status)

    async def session(self, request: Request) -> Session:
        s = self.sessions.check(request.cookies.get(COOKIE))

        def recheck() -> None:
            with self.srv.db.read() as conn:
                session_live(conn, s)

        await run_in_threadpool(recheck)
        return s

    async def login_page(self, request: Request, status: int, message: str = "") -> Response:
        cookie, form_token = self.sessions.login_nonce()
        resp = self.render(
            request, "login.html", None, status, message=message, login_token=form_token
        )
        _cookie(resp, LOGIN_COOKIE, cookie, LOGIN_S)
        return resp

    def page(self, fn: Page) -> Callable[[Request], Awaitable[Response]]:
        """An endpoint behind a session; a refusal becomes an HTML page with its code."""

        async def endpoint(request: Request) -> Response:
            s: Session | None = None
            try:
                s = await self.session(request)
                resp = await fn(request, s)
            except OtaError as err:
                resp = await self.error(request, err, s)
            return _secure(resp)

        return endpoint

    async def error(self, request: Request, err: OtaError, s: Session | None) -> Response:
        status = _status_of(err)
        if err.code == ErrorCode.AUTH:
            resp = await self.login_page(request, 401, f"{err.code.value}: {err.detail}")
            resp.delete_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="strict")
        else:
            resp = self.render(request, "error.html", s, status, err=err, http_status=status)
        resp.headers["X-Otaguard-Error"] = err.code.value
        return resp

    # --- log-in --------------------------------------------------------------------------------
    async def login_get(self, request: Request) -> Response:
        return _secure(await self.login_page(request, 200))

    async def login_post(self, request: Request) -> Response:
        try:
            same_origin(request)
            form = await read_form(self.srv, request)
            self.sessions.check_login(request.cookies.get(LOGIN_COOKIE), form.get("csrf"))
            token = form.get("token", "").strip()
            if not token or len(token) > MAX_TOKEN:
                raise ServerError(ErrorCode.AUTH, "give an admin token", 401)

            def lookup() -> tuple[int, str, str] | None:
                with self.srv.db.read() as conn:
                    found = store.token_role(conn, token)  # the API's own token check
                    return None if found is None else (token_id_of(conn, found[0]), *found)

            found = await run_in_threadpool(lookup)
            if found is None:
                ip = request.client.host if request.client else None
                self.srv.auth_failures.note("admin", "bad_token", ip)
                raise ServerError(ErrorCode.AUTH, "unknown or revoked token", 401)
        except OtaError as err:
            return _secure(await self.error(request, err, None))
        cookie, s = self.sessions.issue(*found)
        resp = RedirectResponse("/ui/", status_code=303)
        _cookie(resp, COOKIE, cookie, s.expires - int(self.sessions.clock()))
        resp.delete_cookie(LOGIN_COOKIE, path="/", secure=True, httponly=True, samesite="strict")
        return _secure(resp)

    async def logout(self, request: Request, s: Session) -> Response:
        await checked_form(self.srv, request, self.sessions, s)

        def end() -> None:
            with self.srv.db.write() as conn:
                end_session(conn, s)

        await run_in_threadpool(end)
        resp = RedirectResponse("/ui/login", status_code=303)
        resp.delete_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="strict")
        return resp

    async def static(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in STATIC:
            return _secure(
                await self.error(request, ServerError(ErrorCode.NOT_FOUND, name, 404), None)
            )
        body = resources.files("otaguard.server.dashboard").joinpath("static", name).read_bytes()
        resp = Response(body, media_type=STATIC[name])
        return _secure(resp)

    # --- pages ---------------------------------------------------------------------------------
    async def overview(self, request: Request, s: Session) -> Response:
        svc = self.srv.campaigns

        def work() -> dict[str, Any]:
            with self.srv.db.read() as conn:
                rot = current_rotation(conn)
                return {
                    "fleet": dq.fleet_breakdown(conn),
                    "campaigns": svc.list_campaigns(),
                    "rotation": None if rot is None else {"id": rot.id, "state": rot.state},
                }

        return self.render(request, "overview.html", s, **await run_in_threadpool(work))

    async def fleet(self, request: Request, s: Session) -> Response:
        p = request.query_params
        serial = p.get("serial", "").strip()[:64]
        filters = {k: p.get(k) or None for k in ("model", "hw_rev", "version", "group")}
        page = max(0, min(dq.MAX_SEARCH * 1000, _int(p.get("page"), 0)))

        def work() -> dict[str, Any]:
            with self.srv.db.read() as conn:
                matches = dq.search_serials(conn, serial) if serial else None
                listing = q.list_devices(
                    conn,
                    model=filters["model"],
                    hw_rev=filters["hw_rev"],
                    version=filters["version"],
                    group=filters["group"],
                    limit=100,
                    offset=page * 100,
                )
                return {
                    "fleet": dq.fleet_breakdown(conn),
                    "matches": matches,
                    "listing": listing,
                }

        data = await run_in_threadpool(work)
        if data["matches"] == [serial]:
            return RedirectResponse(_dev_url(serial), status_code=303)
        return self.render(
            request, "fleet.html", s, serial=serial, filters=filters, page=page, **data
        )

    async def device(self, request: Request, s: Session) -> Response:
        serial = request.path_params["serial"]
        svc = self.srv.campaigns

        def work() -> dict[str, Any]:
            with self.srv.db.read() as conn:
                dev = store.device_by_serial(conn, serial)
                if dev is None:
                    raise ServerError(ErrorCode.NOT_FOUND, f"no device {serial}", 404)
                return {
                    "dev": store.device_view(conn, dev),
                    "assignment": q.assignment(conn, dev.id),
                    "reports": dq.device_reports(conn, dev.id),
                    "cert": dq.device_cert(conn, dev.id),
                    "campaigns": svc.device_progress(conn, dev.id),
                }

        data = await run_in_threadpool(work)
        return self.render(request, "device.html", s, now=store.now_s(), **data)

    async def campaigns(self, request: Request, s: Session) -> Response:
        rows = await run_in_threadpool(self.srv.campaigns.list_campaigns)
        return self.render(request, "campaigns.html", s, campaigns=rows)

    async def _campaign_ctx(self, name: str) -> dict[str, Any]:
        svc = self.srv.campaigns
        stale = 2 * self.srv.settings.poll_interval
        st = await run_in_threadpool(svc.status, name, stale_after=stale)

        def work() -> tuple[list[tuple[int, str]], dict[str, Any]]:
            with self.srv.db.read() as conn:
                return dq.campaign_finishes(conn, name), dq.campaign_policy(conn, name)

        finishes, policy = await run_in_threadpool(work)
        chart = charts.campaign_chart(st, finishes, policy, store.now_s())
        return {"c": st, "policy": policy, "chart": chart}

    async def campaign(self, request: Request, s: Session) -> Response:
        ctx = await self._campaign_ctx(request.path_params["name"])
        return self.render(request, "campaign.html", s, **ctx)

    async def campaign_live(self, request: Request, s: Session) -> Response:
        ctx = await self._campaign_ctx(request.path_params["name"])
        return self.render(request, "_campaign_live.html", s, **ctx)

    async def campaign_action(self, request: Request, s: Session) -> Response:
        form = await checked_form(self.srv, request, self.sessions, s)
        check_role(s.role, PERMISSIONS["campaign"], "campaign")  # as POST /admin/v1/campaigns/…
        action = request.path_params["action"]
        if action not in ACTIONS:
            raise ServerError(ErrorCode.NOT_FOUND, f"no campaign action {action!r}", 404)
        reason = check_reason(form.get("reason") or None)
        name = request.path_params["name"]
        await run_in_threadpool(self.srv.campaigns.transition, name, action, reason)
        log.warning("dashboard: %r (%s) did %s on campaign %r", s.name, s.role, action, name)
        return RedirectResponse(_campaign_url(name), status_code=303)

    def _rotation_ctx(self) -> dict[str, Any]:
        with self.srv.db.read() as conn:
            rot = current_rotation(conn)
            if rot is None:
                return {"rot": None}
            devices = targeted(conn, rot)  # read once: the view's progress and the spread
            view = rotation_view(self.srv, conn, rot, DEFAULT_WARN_DAYS, devices)
            spread = dq.keylist_spread(devices)
        now = store.now_s()
        with self._lock:
            samples = self._spread.setdefault(rot.id, [])
            if not samples or samples[-1][0] < now or samples[-1][1] != spread:
                samples.append((now, spread))
                del samples[:-MAX_SAMPLES]
            samples = list(samples)
        return {
            "rot": view,
            "spread": spread,
            "chart": charts.rotation_chart(view, samples),
            "bars": charts.bar_chart(
                "devices per key-list version now",
                [(f"v{v}", n, charts.version_css(v, view)) for v, n in spread.items()],
            ),
        }

    async def rotation(self, request: Request, s: Session) -> Response:
        ctx = await run_in_threadpool(self._rotation_ctx)
        return self.render(request, "rotation.html", s, **ctx)

    async def rotation_live(self, request: Request, s: Session) -> Response:
        ctx = await run_in_threadpool(self._rotation_ctx)
        return self.render(request, "_rotation_live.html", s, **ctx)

    async def releases(self, request: Request, s: Session) -> Response:
        def work() -> dict[str, Any]:
            with self.srv.db.read() as conn:
                return {"releases": q.list_releases(conn), "release_key": release_key(conn)}

        data = await run_in_threadpool(work)
        data["signing"] = await run_in_threadpool(signing_audit, self.srv, data["releases"])
        revoked = _revoked_keys(self.srv)
        keys = _key_names(self.srv)
        return self.render(request, "releases.html", s, keys=keys, revoked=revoked, **data)

    async def audit(self, request: Request, s: Session) -> Response:
        def work() -> dict[str, Any]:
            with self.srv.db.read() as conn:
                releases = q.list_releases(conn)
            return {**rotation_audit(self.srv), "signing": signing_audit(self.srv, releases)}

        data = await run_in_threadpool(work)
        return self.render(request, "audit.html", s, keys=_key_names(self.srv), **data)


def _allowed(s: Session | None, perm: str) -> bool:
    """Whether the page offers a button: the same decision the action will make."""
    if s is None:
        return False
    try:
        check_role(s.role, PERMISSIONS[perm], perm)
    except ServerError:
        return False
    return True


def _int(v: str | None, default: int) -> int:
    n = decimal(v) if v is not None else None
    return default if n is None else n


def _dev_url(serial: str) -> str:
    return "/ui/devices/" + urllib.parse.quote(serial, safe="")


def _campaign_url(name: str) -> str:
    return "/ui/campaigns/" + urllib.parse.quote(name, safe="")


def _secure(resp: Response) -> Response:
    for k, v in SECURITY_HEADERS.items():
        resp.headers[k] = v
    return resp


def _cookie(resp: Response, name: str, value: str, max_age: int) -> None:
    resp.set_cookie(
        name, value, max_age=max_age, path="/", secure=True, httponly=True, samesite="strict"
    )


def _revoked_keys(srv: ServerContext) -> set[str]:
    """kid hex of the keys the server's current key list revokes."""
    ts = srv.trust.resolver
    return {k.hex() for k in ts.keylist.revoked} if isinstance(ts, TrustStore) else set()


def _key_names(srv: ServerContext) -> dict[str, str]:
    """kid hex → the name the trust store gives the key (for "who signed what")."""
    ts = srv.trust.resolver
    if not isinstance(ts, TrustStore):
        return {}
    return {a.key_id.hex(): a.trusted.name for a in ts.keylist.authorizations}


def dashboard_routes(srv: ServerContext) -> list[BaseRoute]:
    """One mount, ``/ui``: not a :class:`Route`, so the API's OpenAPI document (built from
    the admin app's routes) and the schema-driven tests leave the HTML pages out."""
    ui = Dashboard(srv)
    pg = ui.page
    pages = [
        Route("/login", ui.login_get, methods=["GET"]),
        Route("/login", ui.login_post, methods=["POST"]),
        Route("/logout", pg(ui.logout), methods=["POST"]),
        Route("/static/{name}", ui.static, methods=["GET"]),
        Route("/", pg(ui.overview), methods=["GET"]),
        Route("/fleet", pg(ui.fleet), methods=["GET"]),
        Route("/devices/{serial}", pg(ui.device), methods=["GET"]),
        Route("/campaigns", pg(ui.campaigns), methods=["GET"]),
        Route("/campaigns/{name}", pg(ui.campaign), methods=["GET"]),
        Route("/campaigns/{name}/live", pg(ui.campaign_live), methods=["GET"]),
        Route("/campaigns/{name}/{action}", pg(ui.campaign_action), methods=["POST"]),
        Route("/rotation", pg(ui.rotation), methods=["GET"]),
        Route("/rotation/live", pg(ui.rotation_live), methods=["GET"]),
        Route("/releases", pg(ui.releases), methods=["GET"]),
        Route("/audit", pg(ui.audit), methods=["GET"]),
    ]
    return [Mount("/ui", routes=pages)]
