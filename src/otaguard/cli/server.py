"""``otaguard server``: run the update server, manage admin tokens."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from ..errors import ErrorCode, OtaError, UsageError
from .common import lifetime_options, lifetime_seconds
from .fleet import _data_dir_option, _db_option, _open_db

if TYPE_CHECKING:
    from ..crypto.cose import Signer
    from ..server.pki.renewal import CertIssuer
    from ..server.runtime import RunOptions


@click.group()
def server() -> None:
    """The update server (device API over mTLS, admin API)."""


@server.command("run")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="TOML file with any of the options below (flags given here override it).",
)
@_data_dir_option
@_db_option
@click.option("--ca-cert", type=click.Path(dir_okay=False, path_type=Path))
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
    "trusted_proxies",
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
    "--signing-audit-log",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The signing service's audit log (or a copy): verified and shown by the dashboard.",
)
@click.option(
    "--signing-audit-key",
    "signing_audit_keys",
    multiple=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="PEM public key that seals the signing audit log; repeat for rotated keys.",
)
@click.option(
    "--dashboard-session-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="32+ random bytes that sign dashboard sessions: the same file on every node of a "
    "cluster (default: a key per process; a restart logs everyone out).",
)
@click.option(
    "--issuing-ca-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Fleet CA directory: renew device certificates (POST /v1/certificate). The CA key "
    "passphrase comes from $OTAGUARD_CA_PASSPHRASE, an HSM PIN from $OTAGUARD_PKCS11_PIN.",
)
@click.option("--cert-lifetime", default="90d", show_default=True, help="Renewed cert lifetime.")
@click.option("--pkcs11-module", metavar="PATH", envvar="OTAGUARD_PKCS11_MODULE")
@click.option(
    "--header-timeout",
    default=10.0,
    show_default=True,
    type=click.FloatRange(0.01, 86400),
    help="Seconds a client has to send a request's complete header block.",
)
@click.option(
    "--body-timeout",
    default=30.0,
    show_default=True,
    type=click.FloatRange(0.01, 86400),
    help="Seconds the server waits for the next part of a request body.",
)
@click.option(
    "--body-min-rate",
    default=16384,
    show_default=True,
    type=click.IntRange(1, 1 << 40),
    help="Bytes per second a request body must average (after --body-timeout of grace).",
)
@click.option(
    "--tuf-timestamp-hours",
    default=24,
    show_default=True,
    type=click.IntRange(1, 24 * 366),
    help="TUF repository: timestamp expiry (how long a frozen repository goes unnoticed).",
)
@click.option(
    "--tuf-snapshot-pkcs11-uri",
    metavar="URI",
    help="TUF repository: the snapshot key in an HSM (with --tuf-timestamp-pkcs11-uri; "
    "default: a key file generated in the data directory).",
)
@click.option("--tuf-timestamp-pkcs11-uri", metavar="URI", help="TUF repository: timestamp key.")
@click.option(
    "--tuf-max-targets-days",
    default=366,
    show_default=True,
    type=click.IntRange(1, 3660),
    help="TUF repository: uploaded targets expiring further ahead are refused (E_POLICY).",
)
@click.option(
    "--storage-backend",
    type=click.Choice(["local", "s3"]),
    help="Blob store: DATA_DIR/blobs (local, the default) or an S3-compatible bucket (s3; "
    "credentials from boto3's chain: $AWS_ACCESS_KEY_ID/$AWS_SECRET_ACCESS_KEY, a profile, an "
    "instance role).",
)
@click.option("--s3-bucket", help="S3 blob store: the bucket.")
@click.option(
    "--s3-endpoint-url", metavar="URL", help="S3 blob store: MinIO, Ceph RGW, ... (default AWS)."
)
@click.option("--s3-region", help="S3 blob store: the region.")
@click.option("--s3-prefix", help="S3 blob store: key prefix inside the bucket.")
@click.option(
    "--workers",
    default=1,
    show_default=True,
    type=click.IntRange(1, 64),
    help="Processes serving the device listener (above 1 needs PostgreSQL); e.g. the "
    "number of cores. The admin listener stays in the first.",
)
@click.pass_context
def run(ctx: click.Context, /, config_file: Path | None, **flags: object) -> None:
    """Migrate the database and serve until interrupted."""
    from ..server.runtime import NodeLayout, run_node

    values = run_values(ctx, config_file, flags)
    layout = NodeLayout(
        host=values["host"],
        port=values["port"],
        admin_host=values["admin_host"],
        admin_port=values["admin_port"],
        workers=values["workers"],
        db_url=values.get("db_url"),
    )
    # Keys are opened in each process of the node, after its workers are forked.
    run_node(lambda: run_options(values), layout)


def run_values(
    ctx: click.Context, config_file: Path | None, flags: dict[str, object]
) -> dict[str, Any]:
    """The file's values, overridden by every flag given on the command line or through its
    environment variable; click's defaults fill in what neither gives."""
    from ..server.config import load_server_config

    values = load_server_config(config_file) if config_file is not None else {}
    for name, value in flags.items():
        source = ctx.get_parameter_source(name)
        given = source not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)
        if given or name not in values:
            values[name] = list(value) if isinstance(value, tuple) else value
    return values


def run_options(values: dict[str, Any]) -> RunOptions:
    """The options with their keys opened (PINs and passphrases from the environment)."""
    from ..server.runtime import RunOptions

    values = dict(values)
    if values.get("ca_cert") is None:
        raise UsageError(ErrorCode.USAGE, "--ca-cert (or tls.ca_cert in --config) is required")
    keys = {k: values.pop(k, None) for k in _KEY_OPTIONS}
    return RunOptions(
        **values,
        audit_sealer=_audit_sealer(keys),
        issuer=_issuer(keys),
        tuf_online=_tuf(keys),
        session_key=_session_key(keys["dashboard_session_key_file"]),
    )


# Options that name keys: loaded here (PINs and passphrases from the environment), so that
# RunOptions carries the opened keys and the server package never reads a secret itself.
_KEY_OPTIONS = (
    "audit_seal_pkcs11_uri",
    "audit_seal_key_file",
    "issuing_ca_dir",
    "cert_lifetime",
    "pkcs11_module",
    "tuf_snapshot_pkcs11_uri",
    "tuf_timestamp_pkcs11_uri",
    "dashboard_session_key_file",
)


def _session_key(path: Path | None) -> bytes | None:
    """The dashboard's session key (E_CONFIG naming the setting when unusable)."""
    if path is None:
        return None
    from ..fsutil import read_limited
    from ..server.dashboard.session import MIN_KEY

    try:
        key = read_limited(path, 4096)
    except OtaError as err:
        raise OtaError(ErrorCode.CONFIG, f"dashboard.session_key_file: {err.detail}") from None
    if len(key) < MIN_KEY:
        raise OtaError(
            ErrorCode.CONFIG,
            f"dashboard.session_key_file {path}: {len(key)} bytes; needs {MIN_KEY} or more "
            "random bytes (head -c 32 /dev/urandom)",
        )
    return key


def _tuf(keys: dict[str, Any]) -> dict[str, Signer] | None:
    uris = {r: keys[f"tuf_{r}_pkcs11_uri"] for r in ("snapshot", "timestamp")}
    if not any(uris.values()):
        return None
    if not all(uris.values()):
        raise UsageError(
            ErrorCode.USAGE, "give both --tuf-snapshot-pkcs11-uri and --tuf-timestamp-pkcs11-uri"
        )
    from .common import load_signer

    return {r: load_signer(u, keys["pkcs11_module"], None, None) for r, u in uris.items()}


def _audit_sealer(keys: dict[str, Any]) -> Signer | None:
    if not keys["audit_seal_pkcs11_uri"] and keys["audit_seal_key_file"] is None:
        return None
    from .common import load_signer

    return load_signer(
        keys["audit_seal_pkcs11_uri"], keys["pkcs11_module"], keys["audit_seal_key_file"], None
    )


def _issuer(keys: dict[str, Any]) -> CertIssuer | None:
    from ..server.pki.renewal import CertIssuer
    from .common import parse_duration
    from .fleet import _load_ca

    text = keys["cert_lifetime"] or "90d"
    try:
        lifetime = parse_duration(text)
    except UsageError:
        raise UsageError(
            ErrorCode.USAGE, f"--cert-lifetime: want a duration like 90d or 12h: {text!r}"
        ) from None
    if keys["issuing_ca_dir"] is None:
        return None
    return CertIssuer(_load_ca(keys["issuing_ca_dir"], keys["pkcs11_module"]), lifetime)


_S3_KEYS = ("s3_bucket", "s3_endpoint_url", "s3_region", "s3_prefix")


@server.command("migrate-blobs")
@click.option(
    "--config",
    "config_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The server's TOML file: data_dir and [storage] (flags given here override it).",
)
@_data_dir_option
@click.option("--s3-bucket", help="Destination bucket.")
@click.option("--s3-endpoint-url", metavar="URL", help="MinIO, Ceph RGW, ... (default AWS).")
@click.option("--s3-region")
@click.option("--s3-prefix", help="Key prefix inside the bucket.")
@click.pass_context
def migrate_blobs(ctx: click.Context, /, config_file: Path | None, **flags: object) -> None:
    """Copy DATA_DIR/blobs into an S3-compatible bucket, each blob verified on the way.

    Idempotent: run it again after an interruption, then switch the server to
    [storage] backend = "s3". Credentials from boto3's chain ($AWS_ACCESS_KEY_ID, ...).
    A blob whose bytes no longer match its name is not copied and is named (E_NOT_FOUND).
    """
    from ..errors import OtaError
    from ..server.config import load_server_config
    from ..server.runtime import RunOptions, open_blob_store
    from ..server.storage.blobs import LocalBlobStore, copy_blobs

    values = load_server_config(config_file) if config_file is not None else {}
    for name, value in flags.items():
        source = ctx.get_parameter_source(name)
        given = source not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)
        if given or name not in values:
            values[name] = value
    text = {k: None if values.get(k) is None else str(values[k]) for k in _S3_KEYS}
    opts = RunOptions(
        data_dir=Path(values["data_dir"]),
        ca_cert=Path("-"),
        storage_backend="s3",
        s3_bucket=text["s3_bucket"],
        s3_endpoint_url=text["s3_endpoint_url"],
        s3_region=text["s3_region"],
        s3_prefix=text["s3_prefix"],
    )
    src_root = opts.data_dir / "blobs"
    if not src_root.is_dir():
        raise OtaError(ErrorCode.CONFIG, f"no local blob store at {src_root}")
    dst = open_blob_store(opts)
    count, total, present, damaged = copy_blobs(LocalBlobStore(src_root), dst)
    click.echo(
        f"copied {count} blobs ({total} bytes) to s3://{opts.s3_bucket}, {present} already there"
    )
    if damaged:
        raise OtaError(
            ErrorCode.NOT_FOUND,
            f"{len(damaged)} local blobs no longer match their names, not copied: "
            + ", ".join(damaged),
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
    from ..server.storage import store
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
    from ..server.storage import store
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
    from ..server.storage import store

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
