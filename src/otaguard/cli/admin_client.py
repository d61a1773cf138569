"""Compatibility for commands written against the old untyped helper (``admin_call``).

New code uses :class:`otaguard.adminclient.AdminClient` and its typed methods; this only maps
the old call onto :meth:`AdminClient.request`, so there is still one HTTP layer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..adminclient import AdminClient


def admin_call(
    server: str, ca_file: Path | None, method: str, path: str, body: Any = None, **kw: Any
) -> Any:
    """One admin request; the decoded JSON, or AdminError with the server's code."""
    with AdminClient.connect(server, ca_file=ca_file) as client:
        return client.request(method, path, json=body, params=kw.get("params"))
