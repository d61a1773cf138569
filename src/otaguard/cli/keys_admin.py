"""``otaguard keys publish``: upload a signed key list to the update server.

The only ``keys`` command that talks to the network: the list is signed offline (``keys
authorize`` / ``keys revoke``); publishing it needs no key, only a security-officer token
(``$OTAGUARD_ADMIN_TOKEN``). The server checks it against the list it holds (signature,
roles, version above the current one: E_REPLAY) before devices are offered it.
"""

from __future__ import annotations

from pathlib import Path

import click

from ..fsutil import read_limited
from ..trust.documents import MAX_KEYLIST
from .admin_options import admin_options, connect
from .common import emit
from .keys import keys


@keys.command("publish")
@click.option(
    "--keylist",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Signed key list (from `keys authorize` / `keys revoke`).",
)
@admin_options
def publish(keylist: Path, server: str | None, ca_file: Path | None, as_json: bool) -> None:
    """Publish a key list: devices install it at their next check-in (outside a rotation)."""
    doc = read_limited(keylist, MAX_KEYLIST)
    with connect(server, ca_file) as client:
        out = client.put_keylist(doc)
    emit(out, as_json, lambda d: f"key list v{d['version']} published")
