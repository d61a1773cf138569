"""``GET /healthz`` on both listeners: can this process do its job right now?

Two checks, both cheap and both real: the database answers a ``SELECT 1`` in a read
transaction (the pool hands out a working connection), and the blob store's root takes a new
file and gives it back (:meth:`~.blobs.LocalBlobStore.probe`: a full disk, a read-only mount or
lost permissions all fail it). 200 ``{"ok": true, ...}`` or 503 with the check that failed;
the reason is logged, not sent (the answer needs no credential). No authentication: load
balancers and systemd watchdogs call it; the per-IP limit still applies.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sqlalchemy import text
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from ..errors import OtaError

if TYPE_CHECKING:
    from .context import ServerContext

log = logging.getLogger("otaguard.server")


def run_checks(srv: ServerContext) -> dict[str, str]:
    checks: dict[str, str] = {}
    try:
        with srv.db.read() as conn:
            conn.execute(text("SELECT 1")).scalar_one()
        checks["database"] = "ok"
    except (OtaError, OSError) as exc:
        log.warning("healthz: database check failed: %s", exc)
        checks["database"] = "failed"
    try:
        srv.blobs.probe()
        checks["blobs"] = "ok"
    except (OtaError, OSError) as exc:
        log.warning("healthz: blob store check failed: %s", exc)
        checks["blobs"] = "failed"
    return checks


async def healthz(srv: ServerContext, request: Request) -> Response:
    checks = await run_in_threadpool(run_checks, srv)
    ok = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"ok": ok, "checks": checks},
        status_code=200 if ok else 503,
        headers={"Cache-Control": "no-store"},
    )
