"""Bearer-token identity for the admin listener: one lookup shared by every admin route.

Roles: ``viewer`` reads; ``operator`` assigns releases and runs campaigns; ``release-manager``
uploads images and releases; ``security-officer`` may do everything, including revoking
devices and publishing key lists. Tokens are stored as SHA-256 only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from ...errors import ErrorCode, ServerError
from ..storage import store

if TYPE_CHECKING:
    from ..context import ServerContext


async def token_identity(srv: ServerContext, request: Request) -> tuple[str, str]:
    """(token name, role) of the request's bearer token, or 401 E_AUTH (missing, unknown,
    revoked, or expired on the server clock: ``store.token_role``)."""
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    ip = request.client.host if request.client else None
    if scheme.lower() != "bearer" or not token.strip():
        srv.auth_failures.note("admin", "no_token", ip)
        raise ServerError(ErrorCode.AUTH, "bearer token required", 401)

    def lookup() -> tuple[str, str] | None:
        with srv.db.read() as conn:
            return store.token_role(conn, token.strip())

    found = await run_in_threadpool(lookup)
    if found is None:
        srv.auth_failures.note("admin", "bad_token", ip)  # counted and logged; nothing written
        raise ServerError(ErrorCode.AUTH, "unknown or revoked token", 401)
    return found


async def require_role(
    srv: ServerContext, request: Request, roles: frozenset[str], what: str
) -> tuple[str, str]:
    """The caller's identity if its role is in ``roles``, else 403 E_FORBIDDEN."""
    name, role = await token_identity(srv, request)
    check_role(role, roles, what)
    return name, role


def check_role(role: str, roles: frozenset[str], what: str) -> None:
    """403 E_FORBIDDEN unless ``role`` is in ``roles``: the one role decision of the admin API
    and the dashboard (whose identity comes from a session instead of a bearer header)."""
    if role not in roles:
        raise ServerError(ErrorCode.FORBIDDEN, f"role {role!r} may not {what}", 403)


# security-officer may do everything (docs/server.md, admin API roles).
PERMISSIONS: dict[str, frozenset[str]] = {
    "read": frozenset({"viewer", "operator", "release-manager", "security-officer"}),
    "assign": frozenset({"operator", "security-officer"}),
    "campaign": frozenset({"operator", "security-officer"}),
    "devices": frozenset({"operator", "security-officer"}),
    "release": frozenset({"release-manager", "security-officer"}),
    "security": frozenset({"security-officer"}),
}


async def authorize(srv: ServerContext, request: Request, permission: str) -> str:
    name, _ = await require_role(srv, request, PERMISSIONS[permission], permission)
    return name
