"""Admin view of device certificates about to expire (``GET /admin/v1/certificates/expiring``).

Renewal is automatic (docs/operations.md#certificate-renewal); this list is how an operator
sees the devices it has not reached yet — offline for most of a lifetime, or talking to a
server without an issuing CA — before they lock themselves out.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ...errors import ErrorCode, ServerError
from ...wire import decimal
from ..storage import store
from .auth import authorize

if TYPE_CHECKING:
    from ..context import ServerContext

_WITHIN = re.compile(r"\A([0-9]{1,6})([smhd]?)\Z")
_UNIT = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WITHIN = 3650 * 86400
MAX_LIMIT = 10_000


def parse_within(text: str) -> int:
    """``30d`` / ``12h`` / ``90m`` / ``3600`` → seconds (at most 3650 days); else E_USAGE."""
    m = _WITHIN.match(text)
    if m is None or int(m.group(1)) * _UNIT[m.group(2)] > MAX_WITHIN:
        raise ServerError(ErrorCode.USAGE, "within: a duration like 30d, 12h or seconds", 400)
    return int(m.group(1)) * _UNIT[m.group(2)]


def cert_routes(srv: ServerContext) -> list[Route]:
    async def expiring(request: Request) -> Response:
        """Devices whose certificate expires within ``within`` (default 30d), soonest first"""
        await authorize(srv, request, "read")
        within = parse_within(request.query_params.get("within", "30d"))
        limit = decimal(request.query_params.get("limit", "1000"))  # ASCII digits only
        if limit is None or not 1 <= limit <= MAX_LIMIT:
            raise ServerError(ErrorCode.USAGE, f"limit: 1..{MAX_LIMIT}", 400)

        def work() -> list[dict[str, object]]:
            with srv.db.read() as conn:
                return store.certs_expiring(conn, store.now_s() + within, limit)

        devices = await run_in_threadpool(work)
        return JSONResponse({"within": within, "now": store.now_s(), "devices": devices})

    return [Route("/admin/v1/certificates/expiring", expiring, methods=["GET"])]
