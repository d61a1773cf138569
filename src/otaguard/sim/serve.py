"""After a simulation: keep its server's data and serve the admin listener for a person.

``otaguard demo --serve`` (and ``simulate --serve``) moves the simulated server's database,
blobs, TLS files and audit log into ``<out>/server`` instead of deleting them, then serves that
data directory's admin listener (API and the ``/ui/`` dashboard) until Ctrl-C, on a clock
frozen at the simulation's end, so the pages show the fleet as the run left it. It prints the
URL and fresh, short-lived admin tokens to log in with.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from ..clock import SimClock
from ..errors import ErrorCode, UsageError

BUNDLE = "trust-bundle.cbor"
STATE = "simulation-end.json"
TOKEN_S = 86400


def keep_server_files(work: Path, dest: Path, bundle: bytes, end: float) -> None:
    """Move the stopped simulated server's data directory out of the scratch directory."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True, mode=0o700)
    for p in sorted(work.glob("otaguard.db*")):
        shutil.move(str(p), dest / p.name)
    for name in ("blobs", "tls", "audit"):
        if (work / name).exists():
            shutil.move(str(work / name), dest / name)
    (dest / BUNDLE).write_bytes(bundle)
    (dest / STATE).write_text(json.dumps({"end": end}) + "\n")


def serve(data: Path, host: str, port: int, *, echo: Callable[[str], None] = print) -> None:
    """Serve ``data``'s admin listener until interrupted (blocks)."""
    import uvicorn

    from ..server.admin_api.rotation import close_audit_log
    from ..server.pki.mtls import bind_socket, run_loop, server_ssl_context, uvicorn_config
    from ..server.runtime import RunOptions, build_server
    from ..server.storage import store

    if not (data / STATE).is_file():
        raise UsageError(ErrorCode.USAGE, f"{data} holds no kept simulation server")
    end = float(json.loads((data / STATE).read_text())["end"])
    clock = SimClock(end)
    prev = store.set_clock(clock)
    tls = data / "tls"
    try:
        srv = build_server(
            RunOptions(
                data_dir=data,
                ca_cert=tls / "ca.pem",
                tls_cert=tls / "server.pem",
                tls_key=tls / "server.key",
                trust_bundle=data / BUNDLE,
            )
        )
        srv.campaigns.clock = clock
        tokens: dict[str, str] = {}
        with srv.db.write() as conn:
            for role in ("operator", "viewer"):
                name = f"demo-{role}-{int(end)}-{len(tokens)}"
                tokens[role] = store.create_token(conn, name, role, valid_for=TOKEN_S)
        ctx = server_ssl_context(
            tls / "server.pem", tls / "server.key", None, require_client_cert=False
        )
        sock = bind_socket(host, port)
        url = f"https://{host}:{sock.getsockname()[1]}/ui/"
        echo(f"dashboard: {url}")
        echo(f"  log in with the operator token: {tokens['operator']}")
        echo(f"  (or the viewer token: {tokens['viewer']}; both expire in 24 h)")
        echo(f"  the server certificate is from the demo's own CA ({tls / 'ca.pem'}):")
        echo("  import it into the browser, or accept the certificate warning once")
        echo("  Ctrl-C stops the server")
        adm = uvicorn.Server(uvicorn_config(srv.asgi("admin"), ctx))
        try:
            with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a person stops it
                run_loop(adm.serve(sockets=[sock]))
        finally:
            close_audit_log(srv)
            srv.db.dispose()
    finally:
        store.set_clock(prev)
