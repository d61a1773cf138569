"""``otaguard signing serve|token|show|approve``: run the HTTP signing service; mint request
tokens; show and approve co-signing requests (two-person rule, :mod:`otaguard.signing.cosign`)."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

import click

from ..crypto.cose import Signer
from ..errors import ErrorCode, OtaError, UsageError
from ..signing.audit import AuditLog
from ..signing.audit_key import check_separate
from ..signing.client import TOKEN_ENV, SigningClient
from ..signing.config import ServiceConfig
from ..signing.cosign import CosignService
from ..signing.http import create_app, format_utc, hash_token, new_token
from ..signing.policy import Role
from ..signing.service import SigningService
from ..signing.state import SigningState
from .common import F, close_signers, emit, lifetime_options, lifetime_seconds, load_signer


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

    from ..server.pki.listener import DeadlineProtocol, Deadlines, with_deadlines

    if bool(tls_cert) != bool(tls_key):
        raise UsageError(ErrorCode.USAGE, "--tls-cert and --tls-key go together")
    cfg = ServiceConfig.load(config)
    signer = load_signer(cfg.pkcs11_uri, cfg.pkcs11_module, cfg.key_file, cfg.alg)
    officers: dict[str, Signer] = {}
    for name, spec in cfg.officers.items():
        officers[name] = load_signer(spec.pkcs11_uri, spec.pkcs11_module, spec.key_file, spec.alg)
    assert cfg.audit_sealer is not None  # load() requires it
    seal = cfg.audit_sealer
    sealer = load_signer(seal.pkcs11_uri, seal.pkcs11_module, seal.key_file, seal.alg)
    check_separate(
        sealer.public_key, [signer.public_key, *(o.public_key for o in officers.values())]
    )
    state = SigningState(cfg.state)
    log = AuditLog.open(cfg.audit_log, sealer, seal_every=cfg.seal_every)
    service = SigningService(signer, cfg.policy, log, state)
    try:
        cosign = CosignService(service, officers, cfg.cosign) if cfg.cosign else None
        now = time.time()
        for e in cfg.tokens.entries:
            if e.not_after is None:
                click.echo(f"WARNING: token for {e.requester!r} never expires", err=True)
            elif e.not_after < now:
                click.echo(f"WARNING: token for {e.requester!r} has expired", err=True)
        app = create_app(
            service, cfg.tokens, max_body=cfg.max_body, sign_rate=cfg.sign_rate, cosign=cosign
        )
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
                    # Failed logins are counted by the TCP peer's address, never a header's.
                    proxy_headers=False,
                ),
                deadlines,
            )
        )
        server.run(sockets=[sock])
    finally:
        service.close()
        state.close()
        close_signers([signer, *officers.values()])


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


def _client_options(func: F) -> F:
    func = click.option("--json", "as_json", is_flag=True)(func)
    func = click.option(
        "--signing-ca",
        type=click.Path(dir_okay=False, path_type=Path),
        help="CA certificate for the signing service's TLS.",
    )(func)
    return click.option(
        "--signing-url", metavar="URL", required=True, help=f"Token from ${TOKEN_ENV}."
    )(func)


def _view_text(v: dict[str, Any]) -> str:
    reqs = v.get("requests") or [{}]
    r = reqs[0]
    lines = [
        f"co-signing request {v['id']}: {v['status']}, {len(v['approvals'])} of "
        f"{v['threshold']} approvals, expires {format_utc(v['expires'])}",
        f"  requester {v['requester']}",
        f"  release   {r.get('vendor')} {r.get('model')}/{r.get('hw_rev')} {r.get('version')} "
        f"(security counter {r.get('security_counter')}, sequence {v['sequence']}"
        f"{', DOWNGRADE' if r.get('downgrade') else ''}"
        f"{', FAST-FORWARD' if r.get('fast_forward') else ''})",
        f"  image     {r.get('image_size')} bytes {r.get('digest_alg')}:{r.get('image_digest')}",
    ]
    lines += [
        f"  delta     from {d.get('delta_base_digest')} ({d.get('delta_patch_size')} bytes)"
        for d in reqs[1:]
    ]
    lines.append(f"  digest    {v['request_digest']}")
    lines += [
        f"  approved  {a['officer']} (key {a['kid']}) at {format_utc(a['time'])}"
        for a in v["approvals"]
    ]
    if v.get("error"):
        lines.append(f"  error     {v['error']}")
    return "\n".join(lines)


@signing.command("show")
@click.argument("request_id", metavar="ID")
@_client_options
def show_cmd(request_id: str, signing_url: str, signing_ca: Path | None, as_json: bool) -> None:
    """Show a co-signing request: what it would sign, its approvals, its status."""
    with SigningClient(signing_url, os.environ.get(TOKEN_ENV, ""), ca_file=signing_ca) as c:
        view = c.cosign_get(request_id)
    view.pop("envelopes", None)
    emit(view, as_json, _view_text)


@signing.command("approve")
@click.argument("request_id", metavar="ID")
@click.option(
    "--digest",
    metavar="HEX",
    help="The request digest you reviewed (from 'signing show'); refused if the request "
    "holds anything else.",
)
@_client_options
def approve_cmd(
    request_id: str,
    digest: str | None,
    signing_url: str,
    signing_ca: Path | None,
    as_json: bool,
) -> None:
    """Approve (sign with your officer key) a co-signing request.

    The request is shown first; the approval names its digest, so the service signs only the
    manifests shown here (or the ones --digest names).
    """
    with SigningClient(signing_url, os.environ.get(TOKEN_ENV, ""), ca_file=signing_ca) as c:
        view = c.cosign_get(request_id)
        if not as_json:
            click.echo(_view_text(view), err=True)
        want = digest.lower() if digest else str(view["request_digest"])
        if digest and want != view["request_digest"]:
            raise OtaError(
                ErrorCode.REQUEST_CHANGED,
                f"request {request_id} holds digest {view['request_digest']}, not {digest}",
            )
        done = c.cosign_approve(request_id, want)
    done.pop("envelopes", None)
    emit(done, as_json, _view_text)
