"""Signed dashboard sessions: a cookie the server can check without storing it.

The cookie never holds the admin token. It holds claims signed with HMAC-SHA256 under a key
drawn at random when the server starts (so a restart ends every session): a random session
id, the token's row id, name and role, and the session's own expiry. Every request re-reads
the token row (:func:`token_by_id`), so a token revoked or expired on the server clock ends
its sessions on the next request, and a role changed under it is noticed.

The anti-forgery token of a session's forms is an HMAC of its session id under the same key
(a synchronizer token the browser cannot compute); log-in, which has no session yet, gets a
short-lived signed nonce cookie whose HMAC the form must carry.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from weakref import WeakKeyDictionary

from sqlalchemy import Connection, select

from ...errors import ErrorCode, ServerError
from ..storage import models as m
from ..storage import store

if TYPE_CHECKING:
    from ..context import ServerContext

COOKIE = "__Host-otg_session"  # __Host-: Secure, Path=/, no Domain, or the browser drops it
LOGIN_COOKIE = "__Host-otg_login"
SESSION_S = 8 * 3600
LOGIN_S = 600
MAX_COOKIE = 1024


@dataclass(frozen=True)
class Session:
    sid: str
    token_id: int
    name: str
    role: str
    expires: int


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _same(given: str, want: str) -> bool:
    """Constant-time, and any text (compare_digest refuses non-ASCII str)."""
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), want.encode())


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Sessions:
    """Issue and check session cookies and anti-forgery tokens (one per server process)."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._key = secrets.token_bytes(32)
        self.clock = clock
        self._ended: dict[str, int] = {}  # logged-out session ids until their expiry
        self._lock = threading.Lock()

    def _mac(self, purpose: str, data: bytes) -> str:
        return _b64(hmac.new(self._key, purpose.encode() + b"\0" + data, hashlib.sha256).digest())

    def _seal(self, purpose: str, claims: dict[str, Any]) -> str:
        body = _b64(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
        return f"{body}.{self._mac(purpose, body.encode())}"

    def _open(self, purpose: str, cookie: str | None) -> dict[str, Any]:
        """The claims of a cookie this server signed for ``purpose`` and not yet expired."""
        if not cookie or len(cookie) > MAX_COOKIE or cookie.count(".") != 1:
            raise ServerError(ErrorCode.AUTH, "log in first", 401)
        body, mac = cookie.split(".")
        if not _same(mac, self._mac(purpose, body.encode("utf-8", "surrogatepass"))):
            raise ServerError(ErrorCode.AUTH, "session not signed by this server", 401)
        try:
            claims = json.loads(_unb64(body))
        except (ValueError, UnicodeDecodeError):
            raise ServerError(ErrorCode.AUTH, "malformed session", 401) from None
        exp = claims.get("exp") if isinstance(claims, dict) else None
        if not isinstance(exp, int) or self.clock() >= exp:
            raise ServerError(ErrorCode.AUTH, "session expired: log in again", 401)
        return claims  # type: ignore[no-any-return]

    # --- sessions ------------------------------------------------------------------------------
    def issue(self, token_id: int, name: str, role: str) -> tuple[str, Session]:
        s = Session(secrets.token_urlsafe(16), token_id, name, role, int(self.clock()) + SESSION_S)
        claims = {"sid": s.sid, "tid": token_id, "n": name, "r": role, "exp": s.expires}
        return self._seal("session", claims), s

    def check(self, cookie: str | None) -> Session:
        c = self._open("session", cookie)
        try:
            s = Session(str(c["sid"]), int(c["tid"]), str(c["n"]), str(c["r"]), int(c["exp"]))
        except (KeyError, TypeError, ValueError):
            raise ServerError(ErrorCode.AUTH, "malformed session", 401) from None
        with self._lock:
            if s.sid in self._ended:
                raise ServerError(ErrorCode.AUTH, "logged out", 401)
        return s

    def end(self, s: Session) -> None:
        now = int(self.clock())
        with self._lock:
            self._ended = {k: v for k, v in self._ended.items() if v > now}
            self._ended[s.sid] = s.expires

    def csrf(self, s: Session) -> str:
        return self._mac("csrf", s.sid.encode())

    def check_csrf(self, s: Session, value: object) -> None:
        if not isinstance(value, str) or not _same(value, self.csrf(s)):
            raise ServerError(ErrorCode.CSRF, "form lacks this session's anti-forgery token", 403)

    # --- log-in form ---------------------------------------------------------------------------
    def login_nonce(self) -> tuple[str, str]:
        """(cookie, form token) for the log-in form."""
        nonce = secrets.token_urlsafe(16)
        cookie = self._seal("login", {"nonce": nonce, "exp": int(self.clock()) + LOGIN_S})
        return cookie, self._mac("login-form", nonce.encode())

    def check_login(self, cookie: str | None, value: object) -> None:
        try:
            nonce = str(self._open("login", cookie).get("nonce"))
        except ServerError:
            raise ServerError(
                ErrorCode.CSRF, "log-in form expired or not from this server: reload it", 403
            ) from None
        want = self._mac("login-form", nonce.encode())
        if not isinstance(value, str) or not _same(value, want):
            raise ServerError(ErrorCode.CSRF, "log-in form lacks its anti-forgery token", 403)


_BY_SERVER: WeakKeyDictionary[ServerContext, Sessions] = WeakKeyDictionary()
_BY_SERVER_LOCK = threading.Lock()


def sessions_of(srv: ServerContext) -> Sessions:
    """The server's session keys (made on first use; tests reach the clock through this)."""
    with _BY_SERVER_LOCK:
        s = _BY_SERVER.get(srv)
        if s is None:
            s = _BY_SERVER[srv] = Sessions()
        return s


def token_id_of(conn: Connection, name: str) -> int:
    row = conn.execute(select(m.admin_tokens.c.id).where(m.admin_tokens.c.name == name)).first()
    if row is None:
        raise ServerError(ErrorCode.AUTH, "unknown or revoked token", 401)
    return int(row.id)


def token_by_id(conn: Connection, s: Session) -> None:
    """The session's token must still be live, with the name and role it was issued for
    (401 E_AUTH otherwise), on the same server clock :func:`store.token_role` uses."""
    t = m.admin_tokens
    row = conn.execute(
        select(t.c.name, t.c.role, t.c.revoked, t.c.expires_at).where(t.c.id == s.token_id)
    ).first()
    if row is None or row.revoked or row.name != s.name or row.role != s.role:
        raise ServerError(ErrorCode.AUTH, "the session's token was revoked or changed", 401)
    if row.expires_at is not None and store.now_s() >= row.expires_at:
        raise ServerError(ErrorCode.AUTH, "token expired", 401)
