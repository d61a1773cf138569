"""``otaguard signing serve|token``: run the HTTP signing service; mint request tokens."""

from __future__ import annotations

import json
import socket
import sys
import time
from pathlib import Path

import click

from ..errors import ErrorCode, UsageError
from ..signing.audit import AuditLog
from ..signing.config import ServiceConfig
from ..signing.http import create_app, format_utc, hash_token, new_token
from ..signing.policy import Role
from ..signing.service import SigningService
from ..signing.state import SigningState
from .common import lifetime_options, lifetime_seconds, load_signer


@click.group()
def signing() -> None:
    """The signing service CI talks to (it holds the HSM session; CI holds only a token)."""


@signing.command("serve")
@click.option(
    "--config", type=click.Path(dir_okay=False, exists=True, path_type=Path), required=True
)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8443, show_default=True,
              help="0 = pick a free port (printed on stderr).")  # fmt: skip
@click.option("--tls-cert", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--tls-key", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option("--header-timeout", default=10.0, show_default=True,
              type=click.FloatRange(0.01, 86400),
              help="Seconds a client has to send a request's complete header block.")  # fmt: skip
@click.option("--body-timeout", default=30.0, show_default=True,
              type=click.FloatRange(0.01, 86400),
              help="Seconds the service waits for the next part of a request body.")  # fmt: skip
def serve(
    config: Path,
    host: str,
    port: int,
    tls_cert: Path | None,
    tls_key: Path | None,
    header_timeout: float,
    body_timeout: float,
) -> None:
    """Serve POST /v1/sign until interrupted; the audit log is sealed on shutdown."""
    import uvicorn

    from ..server.listener import DeadlineProtocol, Deadlines, with_deadlines

    if bool(tls_cert) != bool(tls_key):
        raise UsageError(ErrorCode.USAGE, "--tls-cert and --tls-key go together")
    cfg = ServiceConfig.load(config)
    signer = load_signer(cfg.pkcs11_uri, cfg.pkcs11_module, cfg.key_file, cfg.alg)
    state = SigningState(cfg.state)
    log = AuditLog.open(cfg.audit_log, signer, seal_every=cfg.seal_every)
    service = SigningService(signer, cfg.policy, log, state)
    try:
        now = time.time()
        for e in cfg.tokens.entries:
            if e.not_after is None:
                click.echo(f"WARNING: token for {e.requester!r} never expires", err=True)
            elif e.not_after < now:
                click.echo(f"WARNING: token for {e.requester!r} has expired", err=True)
        app = create_app(service, cfg.tokens, max_body=cfg.max_body, sign_rate=cfg.sign_rate)
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        scheme = "https" if tls_cert else "http"
        actual = sock.getsockname()[1]
        if not tls_cert and host not in ("127.0.0.1", "::1", "localhost"):
            click.echo("WARNING: serving without TLS on a non-loopback address", err=True)
        click.echo(f"otaguard signing service listening on {scheme}://{host}:{actual}", err=True)
        sys.stderr.flush()
        deadlines = Deadlines(header_timeout, body_timeout, listener="signing")
        server = uvicorn.Server(
            with_deadlines(
                uvicorn.Config(
                    app,
                    http=DeadlineProtocol,
                    log_level="warning",
                    ssl_certfile=str(tls_cert) if tls_cert else None,
                    ssl_keyfile=str(tls_key) if tls_key else None,
                ),
                deadlines,
            )
        )
        server.run(sockets=[sock])
    finally:
        service.close()
        state.close()
        close = getattr(signer, "close", None)
        if callable(close):
            close()


@signing.command("token")
@click.option("--requester", required=True, help="Requester id (must match the policy file).")
@click.option(
    "--role",
    type=click.Choice([r.value for r in Role]),
    default=Role.RELEASE.value,
    show_default=True,
)
@lifetime_options(
    "Lifetime, e.g. 90d or 12h; written as not_after (RFC 3339 UTC).",
    "Write no not_after: the token never expires.",
)
def token_cmd(requester: str, role: str, valid_for: str | None, no_expiry: bool) -> None:
    """Mint a request token: the token goes to CI's secret store, the entry into the config."""
    lifetime = lifetime_seconds(valid_for, no_expiry)
    tok = new_token()
    entry = {"sha256": hash_token(tok), "requester": requester, "role": role}
    if lifetime is not None:
        entry["not_after"] = format_utc(time.time() + lifetime)
    click.echo(f"token (give to the requester; shown once): {tok}", err=True)
    if lifetime is None:
        click.echo("WARNING: this token never expires (--no-expiry)", err=True)
    else:
        click.echo(f"token expires at {entry['not_after']}", err=True)
    click.echo(json.dumps(entry, sort_keys=True))
