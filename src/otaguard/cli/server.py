"""``otaguard server``: run the update server, manage admin tokens."""

from __future__ import annotations

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
def token_create(
    name: str,
    role: str,
    valid_for: str | None,
    no_expiry: bool,
    data_dir: Path,
    db_url: str | None,
) -> None:
    """Create an admin bearer token (printed once; only its hash is stored).

    stdout's first line is the token (scripts read it); the expiry goes to stderr.
    """
    from ..server import store
    from ..signing.http import format_utc

    lifetime = lifetime_seconds(valid_for, no_expiry)  # before the database: no row on error
    db = _open_db(data_dir, db_url)
    with db.write() as conn:
        token = store.create_token(conn, name, role, valid_for=lifetime)
        expires_at = store.token_expiry(conn, name)
    click.echo(token)
    if expires_at is None:
        click.echo(f"WARNING: admin token {name!r} never expires (--no-expiry)", err=True)
    else:
        click.echo(f"token {name!r} expires at {format_utc(expires_at)}", err=True)


@server.command("migrate")
@_data_dir_option
@_db_option
def migrate(data_dir: Path, db_url: str | None) -> None:
    """Bring the database schema to the newest revision."""
    db = _open_db(data_dir, db_url)
    click.echo(f"schema at revision {db.current_revision()}")
