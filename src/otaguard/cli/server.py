"""``otaguard server``: run the update server, manage admin tokens."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .common import lifetime_options, lifetime_seconds
from .fleet import _data_dir_option, _db_option, _open_db


@click.group()
def server() -> None:
    """The update server (device API over mTLS, admin API)."""


@server.command("run")
@_data_dir_option
@_db_option
@click.option("--ca-cert", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8443, show_default=True, type=click.IntRange(0, 65535))
@click.option("--admin-host", default="127.0.0.1", show_default=True)
@click.option("--admin-port", default=8444, show_default=True, type=click.IntRange(0, 65535))
@click.option("--trust-bundle", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--trusted-key",
    "trusted_keys",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="PEM public key releases must be signed with (instead of a trust bundle).",
)
@click.option(
    "--trusted-proxy",
    "proxies",
    multiple=True,
    help="Address/CIDR of a TLS-terminating proxy allowed to send X-Client-Cert.",
)
@click.option("--proxy-only", is_flag=True, help="Plain HTTP listener for a proxy in front.")
@click.option("--device-rate", default=5.0, show_default=True, type=float)
@click.option("--device-burst", default=30, show_default=True, type=int)
@click.option("--ip-rate", default=200.0, show_default=True, type=float)
@click.option("--ip-burst", default=1000, show_default=True, type=int)
def run(
    data_dir: Path,
    db_url: str | None,
    ca_cert: Path,
    tls_cert: Path | None,
    tls_key: Path | None,
    host: str,
    port: int,
    admin_host: str,
    admin_port: int,
    trust_bundle: Path | None,
    trusted_keys: tuple[Path, ...],
    proxies: tuple[str, ...],
    proxy_only: bool,
    device_rate: float,
    device_burst: int,
    ip_rate: float,
    ip_burst: int,
) -> None:
    """Migrate the database and serve until interrupted."""
    from ..server.runtime import RunOptions
    from ..server.runtime import run as run_server

    run_server(
        RunOptions(
            data_dir=data_dir,
            ca_cert=ca_cert,
            tls_cert=tls_cert,
            tls_key=tls_key,
            db_url=db_url,
            host=host,
            port=port,
            admin_host=admin_host,
            admin_port=admin_port,
            trust_bundle=trust_bundle,
            trusted_keys=list(trusted_keys),
            trusted_proxies=list(proxies),
            proxy_only=proxy_only,
            device_rate=device_rate,
            device_burst=device_burst,
            ip_rate=ip_rate,
            ip_burst=ip_burst,
        )
    )


@server.command("token-create")
@click.option("--name", required=True)
@click.option(
    "--role",
    required=True,
    type=click.Choice(["viewer", "operator", "release-manager", "security-officer"]),
)
@lifetime_options(
    "Lifetime, e.g. 90d or 12h, on the server clock.", "The token never expires (avoid)."
)
@_data_dir_option
@_db_option
@click.option("--json", "as_json", is_flag=True, help="{name, role, token, expires_at}.")
def token_create(
    name: str,
    role: str,
    valid_for: str | None,
    no_expiry: bool,
    data_dir: Path,
    db_url: str | None,
    as_json: bool,
) -> None:
    """Create an admin bearer token (printed once; only its hash is stored).

    stdout's first line is the token (scripts read it); the expiry goes to stderr. Tokens are
    managed on the server host, in its database, not through the admin API (docs/server.md).
    """
    from ..server import store
    from ..signing.http import format_utc

    lifetime = lifetime_seconds(valid_for, no_expiry)  # before the database: no row on error
    db = _open_db(data_dir, db_url)
    with db.write() as conn:
        token = store.create_token(conn, name, role, valid_for=lifetime)
        expires_at = store.token_expiry(conn, name)
    if as_json:
        out = {"name": name, "role": role, "token": token, "expires_at": expires_at}
        click.echo(json.dumps(out, indent=2, sort_keys=True))
    else:
        click.echo(token)
    if expires_at is None:
        click.echo(f"WARNING: admin token {name!r} never expires (--no-expiry)", err=True)
    else:
        click.echo(f"token {name!r} expires at {format_utc(expires_at)}", err=True)


@server.command("token-list")
@click.option("--json", "as_json", is_flag=True, help="One JSON document instead of a table.")
@_data_dir_option
@_db_option
def token_list(as_json: bool, data_dir: Path, db_url: str | None) -> None:
    """List admin tokens: name, role, created, expires, state (never a token or its hash).

    Tokens expiring within 14 days are marked ``expiring`` and named on stderr: renew one by
    creating a new token, then revoking the old one.
    """
    from ..server import store
    from ..signing.http import format_utc

    db = _open_db(data_dir, db_url)
    with db.read() as conn:
        tokens = store.list_tokens(conn)
    if as_json:
        click.echo(json.dumps({"tokens": tokens}, indent=2))
    else:
        click.echo(f"{'NAME':<24} {'ROLE':<17} {'CREATED':<20} {'EXPIRES':<20} STATE")
        for t in tokens:
            exp = "never" if t["expires_at"] is None else format_utc(t["expires_at"])
            click.echo(
                f"{t['name']:<24} {t['role']:<17} {format_utc(t['created_at']):<20} "
                f"{exp:<20} {t['state']}"
            )
    for t in tokens:
        if t["state"] == "expiring":
            click.echo(
                f"WARNING: admin token {t['name']!r} expires at {format_utc(t['expires_at'])}",
                err=True,
            )


@server.command("token-revoke")
@click.option("--name", required=True)
@_data_dir_option
@_db_option
@click.option("--json", "as_json", is_flag=True, help="{name, revoked, changed}.")
def token_revoke(name: str, data_dir: Path, db_url: str | None, as_json: bool) -> None:
    """Revoke an admin token now: every request with it gets 401 from then on."""
    from ..server import store

    db = _open_db(data_dir, db_url)
    with db.write() as conn:
        changed = store.revoke_token(conn, name)
    if as_json:
        click.echo(json.dumps({"name": name, "revoked": True, "changed": changed}, sort_keys=True))
    else:
        click.echo(f"revoked admin token {name!r}" if changed else f"{name!r} was already revoked")


@server.command("migrate")
@_data_dir_option
@_db_option
def migrate(data_dir: Path, db_url: str | None) -> None:
    """Bring the database schema to the newest revision."""
    db = _open_db(data_dir, db_url)
    click.echo(f"schema at revision {db.current_revision()}")
