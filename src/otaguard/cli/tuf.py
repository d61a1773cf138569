"""``otaguard tuf``: the TUF repository for fleets whose Linux devices run a TUF client.

``tuf root`` is a root-key ceremony (offline root key(s) sign root metadata naming the targets
key and the server's online snapshot/timestamp keys); with ``--previous`` it makes the next
version, which must be signed by a threshold of the old *and* the new root keys. ``tuf
targets`` signs a release directory's image as TUF targets metadata with the release key,
through the signing service's policy and audit log (docs/formats.md#tuf-repository).
"""

from __future__ import annotations

import getpass
import json
import time
from pathlib import Path

import click

from ..crypto.algorithms import hash_alg
from ..crypto.keys import PublicKey
from ..errors import ErrorCode, FormatError, UsageError
from ..fsutil import atomic_write, read_limited
from .admin_options import admin_options, connect
from .common import close_signers, emit, load_signers, multi_signer_options

MAX_PEM = 16 * 1024
MAX_JSON = 512 * 1024


@click.group()
def tuf() -> None:
    """TUF metadata (root ceremony, targets signing) for devices with a TUF client."""


def _pems(paths: tuple[Path, ...]) -> list[PublicKey]:
    return [PublicKey.from_pem(read_limited(p, MAX_PEM)) for p in paths]


def _online_keys(path: Path) -> dict[str, PublicKey]:
    try:
        obj = json.loads(read_limited(path, MAX_PEM))
        return {r: PublicKey.from_pem(obj[r].encode()) for r in ("snapshot", "timestamp")}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise FormatError(
            ErrorCode.MALFORMED,
            f"{path}: want the JSON of GET /admin/v1/tuf/online-keys "
            '({"snapshot": PEM, "timestamp": PEM})',
        ) from None


@tuf.command("root")
@click.option(
    "--root-key",
    type=click.Path(dir_okay=False, path_type=Path),
    multiple=True,
    required=True,
    help="Public key (PEM) of the new root role (repeatable).",
)
@click.option("--root-threshold", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--targets-key",
    type=click.Path(dir_okay=False, path_type=Path),
    multiple=True,
    required=True,
    help="Public key (PEM) of the release key that signs targets (repeatable).",
)
@click.option("--targets-threshold", type=click.IntRange(min=1), default=1, show_default=True)
@click.option(
    "--online-keys",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The server's snapshot/timestamp public keys (GET /admin/v1/tuf/online-keys).",
)
@click.option("--expires", default="+365d", show_default=True, metavar="WHEN")
@click.option(
    "--previous",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The current root.json: make the next version (signers: old and new root keys).",
)
@multi_signer_options
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
def root_cmd(
    root_key: tuple[Path, ...],
    root_threshold: int,
    targets_key: tuple[Path, ...],
    targets_threshold: int,
    online_keys: Path,
    expires: str,
    previous: Path | None,
    pkcs11_uris: tuple[str, ...],
    pkcs11_module: str | None,
    key_files: tuple[Path, ...],
    alg_name: str | None,
    out: Path,
) -> None:
    """Sign TUF root metadata with the root key(s) given by --pkcs11-uri/--key-file."""
    from tuf.api.metadata import Metadata, Root

    from ..signing.release import parse_expires
    from ..tufrepo import metadata as tm
    from ..tufrepo.signer import TufSigner

    now = int(time.time())
    until = parse_expires(expires, now)
    assert until is not None
    online = _online_keys(online_keys)
    prev: Metadata[Root] | None = None
    if previous is not None:
        prev = tm.parse(read_limited(previous, MAX_JSON), Root)
    md = tm.build_root(
        version=prev.signed.version + 1 if prev else 1,
        expires=until,
        root_keys=_pems(root_key),
        root_threshold=root_threshold,
        targets_keys=_pems(targets_key),
        targets_threshold=targets_threshold,
        snapshot_key=online["snapshot"],
        timestamp_key=online["timestamp"],
    )
    signers = load_signers(pkcs11_uris, pkcs11_module, key_files, alg_name)
    try:
        data = tm.sign(md, [TufSigner(s) for s in signers])
    finally:
        close_signers(signers)
    # What the server and every TUF client will check, before anything is written.
    if prev is None:
        tm.check_first_root(data, now)
    else:
        tm.check_root_update(prev, data, now)
    atomic_write(out, data, overwrite=False)
    click.echo(f"root v{md.signed.version} written to {out}")


@tuf.command("targets")
@click.argument("release_dir", type=click.Path(file_okay=False, path_type=Path))
@multi_signer_options
@click.option("--audit-log", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--signing-url", metavar="URL", help="Signing service; token from the environment.")
@click.option(
    "--signing-ca",
    type=click.Path(dir_okay=False, path_type=Path),
    help="CA file that signed the signing service's TLS certificate.",
)
@click.option("--state", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--policy", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--requester", help="Requester id for the local policy (default local:$USER).")
@click.option(
    "--previous",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The published targets.json: its other device classes' targets are carried over.",
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--json", "as_json", is_flag=True)
def targets_cmd(
    release_dir: Path,
    pkcs11_uris: tuple[str, ...],
    pkcs11_module: str | None,
    key_files: tuple[Path, ...],
    alg_name: str | None,
    audit_log: Path | None,
    signing_url: str | None,
    signing_ca: Path | None,
    state: Path | None,
    policy: Path | None,
    requester: str | None,
    previous: Path | None,
    out: Path,
    as_json: bool,
) -> None:
    """Sign RELEASE_DIR's image (from ``release create``) as TUF targets metadata.

    Locally (--audit-log with --pkcs11-uri/--key-file) or through the signing service
    (--signing-url, the CI path). Either way the signing state must be the one that signed the
    release: the targets carry that release's sequence number as their version, its counter
    and its expiry."""
    from ..signing.audit import AuditLog
    from ..signing.policy import Policy, Requester, Role, SigningRequest
    from ..signing.release import SUMMARY_FILE
    from ..signing.service import SigningService
    from ..signing.state import SigningState

    s = json.loads(read_limited(release_dir / SUMMARY_FILE, MAX_JSON))
    try:
        req = SigningRequest(
            image_digest=bytes.fromhex(s["image"]["digest"]),
            digest_alg=hash_alg({"sha256": -16, "sha384": -43}[s["image"]["digest_alg"]]),
            image_size=int(s["image"]["size"]),
            vendor=s["vendor"],
            model=s["model"],
            hw_rev=s["hw_rev"],
            version=s["version"],
            min_version=s.get("min_version"),
            security_counter=int(s["security_counter"]),
            expires=s.get("expires"),
            uri=s.get("uri"),
        )
    except (KeyError, TypeError, ValueError):
        raise FormatError(ErrorCode.MALFORMED, f"{release_dir}: not a release summary") from None
    prev = read_limited(previous, MAX_JSON) if previous is not None else None
    if out.exists():
        raise UsageError(ErrorCode.EXISTS, f"{out} already exists; refusing to overwrite")
    if signing_url:
        if pkcs11_uris or key_files or audit_log or state or policy:
            raise UsageError(
                ErrorCode.USAGE,
                "--signing-url excludes --pkcs11-uri/--key-file/--audit-log/--state/--policy",
            )
        import os

        from ..signing.client import TOKEN_ENV, SigningClient

        with SigningClient(signing_url, os.environ.get(TOKEN_ENV, ""), ca_file=signing_ca) as cl:
            data, version, head = cl.sign_tuf_targets(req, prev)
        _write_targets(out, data, version, head.seq, head.hash, as_json)
        return
    if audit_log is None:
        raise UsageError(
            ErrorCode.USAGE, "local signing needs --audit-log (every signature is audited)"
        )
    signers = load_signers(pkcs11_uris, pkcs11_module, key_files, alg_name)
    who = Requester(requester or f"local:{getpass.getuser()}", Role.SECURITY_OFFICER)
    pol = (
        Policy.from_json(read_limited(policy, MAX_JSON))
        if policy is not None
        else Policy.allow_all(who.id)
    )
    st = SigningState(state or audit_log.with_name(audit_log.name + ".state.sqlite"))
    try:
        service = SigningService(signers, pol, AuditLog.open(audit_log, None), st)
        try:
            signed = service.sign_tuf_targets(req, who, prev)
        finally:
            service.close()
    finally:
        st.close()
        close_signers(signers)
    _write_targets(out, signed.data, signed.version, signed.audit.seq, signed.audit.hash, as_json)


def _write_targets(
    out: Path, data: bytes, version: int, seq: int, audit_hash: str, as_json: bool
) -> None:
    from tuf.api.metadata import Targets

    from ..tufrepo import metadata as tm

    if tm.parse(data, Targets).signed.version != version:  # what the service says it signed
        raise FormatError(ErrorCode.MALFORMED, "signed targets do not carry the stated version")
    atomic_write(out, data, overwrite=False)
    emit(
        {"targets_version": version, "out": str(out), "audit": {"seq": seq, "hash": audit_hash}},
        as_json,
    )


# --- publication through the admin API (token in $OTAGUARD_ADMIN_TOKEN) ---------------------------
@tuf.command("online-keys")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@admin_options
def online_keys(out: Path, server: str | None, ca_file: Path | None, as_json: bool) -> None:
    """Fetch the server's snapshot and timestamp public keys for 'tuf root --online-keys'."""
    with connect(server, ca_file) as client:
        keys = client.tuf_online_keys()
    atomic_write(out, json.dumps(keys, indent=2, sort_keys=True).encode())
    emit({"online_keys": str(out), "roles": sorted(keys)}, as_json)


@tuf.command("publish-root")
@click.argument("root_json", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@admin_options
def publish_root(root_json: Path, server: str | None, ca_file: Path | None, as_json: bool) -> None:
    """Publish root metadata (security officer); version N+1 needs the old and new roots."""
    with connect(server, ca_file) as client:
        out = client.put_tuf_root(read_limited(root_json, MAX_JSON))
    emit(out, as_json)


@tuf.command("publish-targets")
@click.argument("targets_json", type=click.Path(dir_okay=False, exists=True, path_type=Path))
@click.option(
    "--image",
    "images",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    multiple=True,
    help="Upload this target image first (repeatable; skip for images already on the server).",
)
@admin_options
def publish_targets(
    targets_json: Path,
    images: tuple[Path, ...],
    server: str | None,
    ca_file: Path | None,
    as_json: bool,
) -> None:
    """Publish targets metadata (release manager): its images first, then the document; the
    server signs a new snapshot and timestamp."""
    with connect(server, ca_file) as client:
        for image in images:
            client.upload_blob(image)
        out = client.put_tuf_targets(read_limited(targets_json, MAX_JSON))
    emit(out, as_json)
