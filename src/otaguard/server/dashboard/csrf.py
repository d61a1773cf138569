"""Reading a dashboard form: small, url-encoded, same-origin, carrying the anti-forgery token.

``SameSite=Strict`` already keeps the session cookie off cross-site posts; the token and the
``Origin`` / ``Sec-Fetch-Site`` check make a forged form fail even in a browser that ignores
SameSite, and the refusal is a typed 403 ``E_CSRF`` before any state changes.
"""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING

from starlette.requests import Request

from ...errors import ErrorCode, ServerError
from .session import Session, Sessions

if TYPE_CHECKING:
    from ..context import ServerContext

MAX_FORM = 4096
FORM_TYPE = "application/x-www-form-urlencoded"


def same_origin(request: Request) -> None:
    """Refuse a post the browser says came from another site (E_CSRF).

    ``Origin: null`` says nothing: with ``Referrer-Policy: no-referrer`` browsers send it on
    our own forms too; a cross-site post still fails on ``Sec-Fetch-Site`` and the token."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise ServerError(ErrorCode.CSRF, "cross-site form post refused", 403)
    origin = request.headers.get("origin")
    if origin is not None and origin != "null":
        host = request.headers.get("host", "")
        if urllib.parse.urlsplit(origin).netloc != host:
            raise ServerError(ErrorCode.CSRF, "form posted from another origin", 403)


async def read_form(srv: ServerContext, request: Request) -> dict[str, str]:
    """The url-encoded body (one value per field; at most ``MAX_FORM`` bytes). Any other
    body is E_CSRF: every dashboard form is url-encoded and carries its token."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != FORM_TYPE:  # not one of our forms, so it cannot carry the token either
        raise ServerError(ErrorCode.CSRF, f"not a dashboard form ({FORM_TYPE})", 403)
    raw = await srv.read_body(request, MAX_FORM)
    try:
        pairs = urllib.parse.parse_qsl(
            raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=16
        )
    except (UnicodeDecodeError, ValueError):
        raise ServerError(ErrorCode.MALFORMED, "unreadable form", 400) from None
    out: dict[str, str] = {}
    for k, v in pairs:
        if k in out:
            raise ServerError(ErrorCode.MALFORMED, f"field {k!r} given twice", 400)
        out[k] = v
    return out


async def checked_form(
    srv: ServerContext, request: Request, sessions: Sessions, s: Session
) -> dict[str, str]:
    """A session's form post, refused with 403 E_CSRF unless it is same-origin and carries
    the session's token."""
    same_origin(request)
    form = await read_form(srv, request)
    sessions.check_csrf(s, form.get("csrf"))
    return form
