"""Every route of the admin API except TUF, health and metrics, in the order they are matched."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.routing import Route

from .campaigns import campaign_routes
from .certificates import cert_routes
from .devices import device_admin_routes
from .keylist import keylist_routes
from .mcuboot import mcuboot_routes
from .releases import release_routes
from .rotation import rotation_routes

if TYPE_CHECKING:
    from ..context import ServerContext


def admin_routes(srv: ServerContext) -> list[Route]:
    return [
        *mcuboot_routes(srv),
        *rotation_routes(srv),
        *cert_routes(srv),
        *campaign_routes(srv),
        *release_routes(srv),
        *device_admin_routes(srv),
        *keylist_routes(srv),
    ]
