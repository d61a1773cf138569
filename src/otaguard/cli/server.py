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
@click.option(
    "--audit-seal-pkcs11-uri",
    metavar="URI",
    help="HSM key that seals the rotation audit log (authorized by 'keys authorize-audit'; "
    "PIN from $OTAGUARD_PKCS11_PIN).",
)
@click.option(
    "--audit-seal-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Development only: an encrypted key file instead of the HSM key.",
)
@click.option(
    "--issuing-ca-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Fleet CA directory: renew device certificates (POST /v1/certificate). The CA key "
    "passphrase comes from $OTAGUARD_CA_PASSPHRASE, an HSM PIN from $OTAGUARD_PKCS11_PIN.",
)
@click.option("--cert-lifetime", default="90d", show_default=True, help="Renewed cert lifetime.")
@click.option("--pkcs11-module", metavar="PATH", envvar="OTAGUARD_PKCS11_MODULE")
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
    audit_seal_pkcs11_uri: str | None,
    audit_seal_key_file: Path | None,
    issuing_ca_dir: Path | None,
    cert_lifetime: str,
    pkcs11_module: str | None,
) -> None:
    """Migrate the database and serve until interrupted."""
    from ..errors import ErrorCode, UsageError
    from ..server.renewal import CertIssuer
    from ..server.runtime import RunOptions
    from ..server.runtime import run as run_server
    from .common import parse_duration
    from .fleet import _load_ca

    try:
        lifetime = parse_duration(cert_lifetime)
    except UsageError:
        raise UsageError(
            ErrorCode.USAGE, f"--cert-lifetime: want a duration like 90d or 12h: {cert_lifetime!r}"
        ) from None
    issuer = None
    if issuing_ca_dir is not None:
        issuer = CertIssuer(_load_ca(issuing_ca_dir, pkcs11_module), lifetime)

    sealer = None
    if audit_seal_pkcs11_uri or audit_seal_key_file:
        from .common import load_signer

        sealer = load_signer(audit_seal_pkcs11_uri, pkcs11_module, audit_seal_key_file, None)
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
            audit_sealer=sealer,
            issuer=issuer,
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
def token_revoke(name: str, data_dir: Path, db_url: str | None) -> None:
    """Revoke an admin token now: every request with it gets 401 from then on."""
    from ..server import store

    db = _open_db(data_dir, db_url)
    with db.write() as conn:
        changed = store.revoke_token(conn, name)
    click.echo(f"revoked admin token {name!r}" if changed else f"{name!r} was already revoked")


@server.command("migrate")
@_data_dir_option
@_db_option
def migrate(data_dir: Path, db_url: str | None) -> None:
    """Bring the database schema to the newest revision."""
    db = _open_db(data_dir, db_url)
    click.echo(f"schema at revision {db.current_revision()}")
