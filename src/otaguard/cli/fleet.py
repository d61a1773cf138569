"""``otaguard fleet``: the fleet CA, device enrollment, revocation, the server certificate."""

from __future__ import annotations

from pathlib import Path

import click

from ..fsutil import read_limited
from .common import PIN_ENV, emit, secret_from_env_or_prompt

CA_PASSPHRASE_ENV = "OTAGUARD_CA_PASSPHRASE"
_db_option = click.option(
    "--db",
    "db_url",
    envvar="OTAGUARD_DB_URL",
    help="Database URL (default: SQLite in --data-dir). Env: OTAGUARD_DB_URL.",
)
_data_dir_option = click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="OTAGUARD_DATA_DIR",
    default=Path("otaguard-data"),
    show_default=True,
    help="Server data directory (holds the default SQLite database).",
)


def _load_ca(ca_dir: Path, pkcs11_module: str | None = None):  # type: ignore[no-untyped-def]
    from ..server.pki.ca import FleetCA

    meta = FleetCA.meta(ca_dir)
    if meta.get("key") == "pkcs11":
        from ..crypto.pkcs11 import Pkcs11Signer

        pin = secret_from_env_or_prompt(PIN_ENV, "Token PIN")
        signer = Pkcs11Signer.open(meta["pkcs11_uri"], pin=pin.decode(), module=pkcs11_module)
        return FleetCA.load(ca_dir, signer=signer)
    return FleetCA.load(
        ca_dir, passphrase=secret_from_env_or_prompt(CA_PASSPHRASE_ENV, "CA passphrase")
    )


def _open_db(data_dir: Path, db_url: str | None):  # type: ignore[no-untyped-def]
    from ..server.runtime import open_database

    return open_database(data_dir, db_url)


@click.group()
def fleet() -> None:
    """Fleet CA, device enrollment and revocation."""


@fleet.command("init-ca")
@click.option("--dir", "ca_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", default="otaguard fleet CA", show_default=True)
@click.option("--days", default=3650, show_default=True, type=click.IntRange(1, 36500))
@click.option("--pkcs11-uri", metavar="URI", help="Use an existing P-256 key in an HSM.")
@click.option("--pkcs11-module", metavar="PATH", envvar="OTAGUARD_PKCS11_MODULE")
@click.option("--json", "as_json", is_flag=True)
def init_ca(
    ca_dir: Path,
    name: str,
    days: int,
    pkcs11_uri: str | None,
    pkcs11_module: str | None,
    as_json: bool,
) -> None:
    """Create the fleet CA (key: encrypted file, passphrase from $OTAGUARD_CA_PASSPHRASE)."""
    from ..server.pki.ca import FleetCA, spki_sha256

    if pkcs11_uri:
        from ..crypto.pkcs11 import Pkcs11Signer

        pin = secret_from_env_or_prompt(PIN_ENV, "Token PIN")
        signer = Pkcs11Signer.open(pkcs11_uri, pin=pin.decode(), module=pkcs11_module)
        ca = FleetCA.create(ca_dir, signer=signer, pkcs11_uri=pkcs11_uri, name=name, days=days)
    else:
        passphrase = secret_from_env_or_prompt(CA_PASSPHRASE_ENV, "CA passphrase", confirm=True)
        ca = FleetCA.create(ca_dir, passphrase=passphrase, name=name, days=days)
    emit(
        {
            "ca_cert": str(ca_dir / "ca.pem"),
            "key": "pkcs11" if pkcs11_uri else str(ca_dir / "ca.key"),
            "spki_sha256": spki_sha256(ca.cert),
        },
        as_json,
    )


@fleet.command("enroll")
@click.option("--ca-dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--serial", required=True)
@click.option("--model", required=True)
@click.option("--hw-rev", required=True)
@click.option("--group", "groups", multiple=True, help="Device group (repeatable).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--days", default=90, show_default=True, type=click.IntRange(1, 3650))
@click.option("--csr", type=click.Path(dir_okay=False, path_type=Path), help="Device's own CSR.")
@click.option("--replace", is_flag=True, help="Re-enroll: the old certificate stops working.")
@click.option("--pkcs11-module", metavar="PATH", envvar="OTAGUARD_PKCS11_MODULE")
@_db_option
@_data_dir_option
@click.option("--json", "as_json", is_flag=True)
def enroll(
    ca_dir: Path,
    serial: str,
    model: str,
    hw_rev: str,
    groups: tuple[str, ...],
    out_dir: Path,
    days: int,
    csr: Path | None,
    replace: bool,
    pkcs11_module: str | None,
    db_url: str | None,
    data_dir: Path,
    as_json: bool,
) -> None:
    """Issue a device certificate and register the device."""
    from ..server.pki.enroll import enroll_device

    ca = _load_ca(ca_dir, pkcs11_module)
    db = _open_db(data_dir, db_url)
    e = enroll_device(
        ca,
        db,
        serial=serial,
        model=model,
        hw_rev=hw_rev,
        groups=list(groups),
        out_dir=out_dir,
        days=days,
        csr_pem=read_limited(csr, 64 * 1024) if csr else None,
        replace=replace,
    )
    emit(
        {
            "serial": e.serial,
            "cert": str(e.cert_path),
            "key": str(e.key_path) if e.key_path else None,
            "fingerprint": e.cert.fingerprint,
            "not_after": e.cert.cert.not_valid_after_utc.isoformat(),
        },
        as_json,
    )


@fleet.command("revoke")
@click.option("--serial", required=True)
@click.option(
    "--server",
    envvar="OTAGUARD_SERVER",
    metavar="URL",
    help="Revoke through the admin API (security-officer token in $OTAGUARD_ADMIN_TOKEN) "
    "instead of in the database directly [env OTAGUARD_SERVER].",
)
@click.option(
    "--ca-file",
    envvar="OTAGUARD_ADMIN_CA",
    type=click.Path(dir_okay=False, path_type=Path),
    help="CA certificate of the admin listener [env OTAGUARD_ADMIN_CA].",
)
@_db_option
@_data_dir_option
@click.option("--json", "as_json", is_flag=True)
def revoke(
    serial: str,
    server: str | None,
    ca_file: Path | None,
    db_url: str | None,
    data_dir: Path,
    as_json: bool,
) -> None:
    """Revoke a device: the server refuses its certificate from the next request on.

    With --server (or $OTAGUARD_SERVER) through the admin API, else in the database at
    --data-dir/--db (on the server host).
    """
    if server:
        from ..adminclient import AdminClient

        with AdminClient.connect(server, ca_file=ca_file) as client:
            client.revoke_device(serial)
    else:
        from ..server.storage import store

        db = _open_db(data_dir, db_url)
        with db.write() as conn:
            store.revoke_device(conn, serial)
    emit({"serial": serial, "revoked": True}, as_json, lambda d: f"revoked {d['serial']}")


@fleet.command("server-cert")
@click.option("--ca-dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--dns", "dns_names", multiple=True)
@click.option("--ip", "ips", multiple=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--days", default=365, show_default=True, type=click.IntRange(1, 3650))
@click.option("--pkcs11-module", metavar="PATH", envvar="OTAGUARD_PKCS11_MODULE")
@click.option("--json", "as_json", is_flag=True)
def server_cert(
    ca_dir: Path,
    dns_names: tuple[str, ...],
    ips: tuple[str, ...],
    out_dir: Path,
    days: int,
    pkcs11_module: str | None,
    as_json: bool,
) -> None:
    """Issue the update endpoint's TLS certificate (serverAuth only) from the fleet CA."""
    from ..server.pki.ca import spki_sha256
    from ..server.pki.enroll import issue_server_cert

    ca = _load_ca(ca_dir, pkcs11_module)
    issued = issue_server_cert(
        ca, out_dir, dns_names=list(dns_names), ip_addresses=list(ips), days=days
    )
    emit(
        {
            "cert": str(out_dir / "server.pem"),
            "key": str(out_dir / "server.key"),
            "spki_sha256": spki_sha256(issued.cert),
        },
        as_json,
    )


@fleet.command("expiring")
@click.option("--within", default="30d", show_default=True, help="e.g. 30d, 12h")
@click.option("--server", "url", envvar="OTAGUARD_SERVER", help="Admin API URL (required).")
@click.option(
    "--ca-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    envvar="OTAGUARD_ADMIN_CA",
    help="CA certificate of the admin endpoint.",
)
@click.option("--json", "as_json", is_flag=True)
def expiring(within: str, url: str | None, ca_file: Path | None, as_json: bool) -> None:
    """Devices whose certificate expires within --within (admin token: $OTAGUARD_ADMIN_TOKEN)."""
    from ..adminclient import AdminClient

    with AdminClient.connect(url, ca_file=ca_file) as client:
        data = client.expiring_certificates(within)
    emit(dict(data), as_json, _expiring_text)


def _expiring_text(data: dict[str, object]) -> str:
    from ..signing.http import format_utc

    devices = data.get("devices")
    assert isinstance(devices, list)
    lines = [f"{len(devices)} device certificate(s) expire within {data.get('within')} s"]
    for d in devices:
        state = "EXPIRED" if d["expired"] else ("renewal pending" if d["renewal_pending"] else "")
        lines.append(f"{d['serial']:<32} {format_utc(d['cert_not_after'])}  {state}".rstrip())
    return "\n".join(lines)
