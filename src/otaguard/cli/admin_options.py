"""What every admin-API command shares: ``--server``, ``--ca-file``, ``--json``, and the client.

The options are never ``required`` for click: ``--help`` must work without a server, and a
missing URL is reported by :meth:`AdminClient.connect` as one ``E_USAGE`` line like every other
error. The token comes only from ``$OTAGUARD_ADMIN_TOKEN`` (never the command line).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from ..adminclient import AdminClient

F = TypeVar("F", bound=Callable[..., Any])

SERVER_ENV = "OTAGUARD_SERVER"
CA_ENV = "OTAGUARD_ADMIN_CA"

server_option = click.option(
    "--server",
    envvar=SERVER_ENV,
    metavar="URL",
    help=f"Admin API base URL, e.g. https://127.0.0.1:8444 [env {SERVER_ENV}].",
)
ca_option = click.option(
    "--ca-file",
    envvar=CA_ENV,
    type=click.Path(dir_okay=False, path_type=Path),
    help=f"CA certificate of the admin listener (the fleet CA) [env {CA_ENV}].",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")


def admin_options(func: F) -> F:
    """``--server``, ``--ca-file`` and ``--json`` (token: ``$OTAGUARD_ADMIN_TOKEN``)."""
    return server_option(ca_option(json_option(func)))


def connect(server: str | None, ca_file: Path | None) -> AdminClient:
    from ..adminclient import AdminClient

    return AdminClient.connect(server, ca_file=ca_file)
