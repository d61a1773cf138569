"""``otaguard keys``: the security officer's key ceremony commands.

The key list file is the officer's working document: ``authorize`` and ``revoke`` each write a
new, higher version of it, signed by the root. ``export-trust`` packs it with the root public
key into the bundle devices are provisioned with; the server publishes the same list so
devices in the field pick up changes on their next check-in.
"""

from __future__ import annotations

import datetime as dt
import time
import uuid
from pathlib import Path
from typing import Any

import click

from ..crypto.algorithms import CoseAlg, KeyKind, parse_alg_name
from ..crypto.cose import Signer
from ..crypto.keys import PublicKey
from ..errors import ErrorCode, OtaError, UsageError
from ..fsutil import atomic_write, read_limited
from ..manifest.class_algs import ALG_NAMES, MAX_TABLE, ClassAlgs, parse_class_alg
from ..trust.bundle import TrustBundle
from ..trust.documents import (
    MAX_KEYLIST,
    KeyList,
    issue_authorization,
    parse_keylist,
    sign_keylist,
)
from ..trust.model import Role, Scope
from .common import (
    PASSPHRASE_ENV,
    PIN_ENV,
    emit,
    load_signer,
    secret_from_env_or_prompt,
    signer_options,
)

MAX_PEM = 16 * 1024


def _now() -> int:
    return int(time.time())


def _parse_time(value: str | None, default: int) -> int:
    if value is None:
        return default
    try:
        parsed = dt.datetime.fromisoformat(value)
    except ValueError:
        raise UsageError(ErrorCode.USAGE, f"not an ISO 8601 date/time: {value!r}") from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return int(parsed.timestamp())


def _iso(t: int) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat().replace("+00:00", "Z")


def _load_public(path: Path) -> PublicKey:
    return PublicKey.from_pem(read_limited(path, MAX_PEM))


def _load_keylist(path: Path, root: PublicKey) -> KeyList:
    return parse_keylist(read_limited(path, MAX_KEYLIST), root, {root.key_id: root})


def _describe(kl: KeyList, now: int) -> dict[str, Any]:
    keys = []
    for a in kl.authorizations:
        t = a.trusted
        if a.key_id in kl.revoked:
            status = "revoked"
        elif now > t.not_after:
            status = "expired"
        elif now < t.not_before:
            status = "not-yet-valid"
        else:
            status = "valid"
        keys.append(
            {
                "kid": a.key_id.hex(),
                "name": t.name,
                "kind": t.key.kind,
                "alg": a.alg.name,
                "roles": sorted(r.value for r in t.roles),
                "scopes": [
                    {
                        "vendor_id": str(s.vendor_id),
                        "class_ids": sorted(str(c) for c in s.class_ids),
                    }
                    for s in t.scopes
                ],
                "not_before": _iso(t.not_before),
                "not_after": _iso(t.not_after),
                "status": status,
            }
        )
    return {
        "version": kl.version,
        "issued_at": _iso(kl.issued_at),
        "threshold": kl.threshold,
        "signer_kid": kl.signer_kid.hex(),
        "revoked": sorted(k.hex() for k in kl.revoked),
        "keys": keys,
    }


def _render(data: dict[str, Any]) -> str:
    lines = [
        f"key list version {data['version']} (issued {data['issued_at']}, "
        f"threshold {data['threshold']})"
    ]
    for k in data["keys"]:
        lines.append(
            f"  {k['kid']}  {k['status']:<13} {k['kind']:<8} {','.join(k['roles']):<17} "
            f"{k['not_before'][:10]} .. {k['not_after'][:10]}  {k['name']}"
        )
    for kid in data["revoked"]:
        if not any(k["kid"] == kid for k in data["keys"]):
            lines.append(f"  {kid}  revoked (removed from list)")
    return "\n".join(lines)


def _generate(
    kind: KeyKind, key_file: Path | None, pkcs11_uri: str | None, pkcs11_module: str | None
) -> PublicKey:
    if bool(key_file) == bool(pkcs11_uri):
        raise UsageError(ErrorCode.USAGE, "give exactly one of --pkcs11-uri or --key-file")
    if key_file is not None:
        from ..crypto.software import SoftwareSigner

        click.echo("WARNING: software key files are for development only.", err=True)
        passphrase = secret_from_env_or_prompt(PASSPHRASE_ENV, "New key passphrase", confirm=True)
        return SoftwareSigner.generate(key_file, kind, passphrase)
    from ..crypto.pkcs11 import generate_keypair, parse_pkcs11_uri

    assert pkcs11_uri is not None
    uri = parse_pkcs11_uri(pkcs11_uri)
    if not uri.object:
        raise UsageError(ErrorCode.USAGE, "the PKCS#11 URI must name the new key: object=LABEL")
    pin = secret_from_env_or_prompt(PIN_ENV, "Token PIN")
    return generate_keypair(uri, uri.object, kind, pin=pin.decode(), module=pkcs11_module)


@click.group()
def keys() -> None:
    """Key ceremonies: root, operational-key authorization, key lists, trust bundles."""


def _generate_options(func: Any) -> Any:
    for opt in reversed(
        [
            click.option(
                "--kind",
                type=click.Choice(["ed25519", "p256"]),
                default="ed25519",
                show_default=True,
                help="Key type (RSA is refused).",
            ),
            click.option(
                "--pkcs11-uri",
                metavar="URI",
                help="Generate inside this token: 'pkcs11:token=T;object=LABEL'.",
            ),
            click.option("--pkcs11-module", metavar="PATH", envvar="OTAGUARD_PKCS11_MODULE"),
            click.option(
                "--key-file",
                type=click.Path(dir_okay=False, path_type=Path),
                help="DEVELOPMENT ONLY: write an encrypted PKCS#8 file here.",
            ),
            click.option(
                "--out-public",
                type=click.Path(dir_okay=False, path_type=Path),
                required=True,
                help="Where to write the public key (PEM).",
            ),
            click.option("--json", "as_json", is_flag=True),
        ]
    ):
        func = opt(func)
    return func


def _create_key(
    kind: KeyKind,
    pkcs11_uri: str | None,
    pkcs11_module: str | None,
    key_file: Path | None,
    out_public: Path,
) -> dict[str, Any]:
    pub = _generate(kind, key_file, pkcs11_uri, pkcs11_module)
    atomic_write(out_public, pub.to_pem(), overwrite=False)
    return {
        "kid": pub.key_id.hex(),
        "kind": pub.kind,
        "public_key": str(out_public),
        "thumbprint": pub.thumbprint.hex(),
    }


@keys.command("init-root")
@_generate_options
def init_root(as_json: bool, **key: Any) -> None:
    """Create the offline root key (in an HSM, or an encrypted file for development).

    Its thumbprint (``otp_hash``) is what manufacturing fuses into each device's OTP.
    """
    info = _create_key(**key)
    otp_hash = info.pop("thumbprint")
    emit({"role": "root", **info, "otp_hash": otp_hash}, as_json)


@keys.command("generate")
@_generate_options
def generate(as_json: bool, **key: Any) -> None:
    """Create an operational signing key; authorize it with `keys authorize`."""
    emit(_create_key(**key), as_json)


def _write_new_list(
    signer: Signer,
    keylist: Path,
    auths: list[bytes],
    revoked: set[bytes],
    threshold: int,
    previous: KeyList | None,
) -> KeyList:
    version = previous.version + 1 if previous else 1
    issued = max(_now(), previous.issued_at if previous else 0)
    data = sign_keylist(
        signer,
        version=version,
        authorizations=auths,
        revoked=revoked,
        threshold=threshold,
        issued_at=issued,
    )
    root = signer.public_key
    kl = parse_keylist(data, root, {root.key_id: root})  # verify before writing
    # A list devices would refuse must never be written.
    from ..trust.store import TrustStore

    TrustStore.create(root, data)
    atomic_write(keylist, data)
    return kl


# --- per-class signature algorithms (manifest/class_algs.py) ---------------------------------
def click_class_alg_options(func: Any) -> Any:
    func = click.option(
        "--class-alg",
        "class_algs",
        multiple=True,
        metavar="MODEL:HWREV=ALG[,ALG]",
        help="Signature algorithms this device class verifies (repeatable), recorded in "
        "KEYLIST.class-algs.json for `release create --class-algs`; a key whose algorithm a "
        "class it is scoped to cannot verify is refused (E_ALGORITHM).",
    )(func)
    return click.option(
        "--key-alg",
        metavar="ALG",
        help="Algorithm the authorized key signs with: ed25519, eddsa (Ed25519 keys), esp256, "
        "es256 (P-256 keys); default ed25519 / esp256.",
    )(func)


def class_algs_path(keylist: Path) -> Path:
    return keylist.with_name(keylist.name + ".class-algs.json")


def _class_algs_for(
    keylist: Path,
    vendor: str,
    vid: uuid.UUID,
    scope: frozenset[uuid.UUID],
    key: PublicKey,
    key_alg: str | None,
    specs: tuple[str, ...],
) -> tuple[CoseAlg, ClassAlgs | None]:
    """The key's algorithm, checked against every class it is scoped to or that ``specs``
    names, and the class table to write (None: unchanged). Runs before the root signs."""
    alg = key.check_alg(parse_alg_name(key_alg)) if key_alg else key.default_alg
    path = class_algs_path(keylist)
    table = ClassAlgs.from_json(read_limited(path, MAX_TABLE)) if path.exists() else ClassAlgs()
    named = set()
    for spec in specs:
        cid, label, algs = parse_class_alg(spec, vendor, vid)
        if scope and cid not in scope:
            raise UsageError(ErrorCode.USAGE, f"--class-alg {spec!r}: class is not in --class")
        table = table.with_entry(cid, label, algs)
        named.add(cid)
    for cid in sorted(scope | named):
        table.require(cid, [alg], f"key {key.key_id.hex()}")
    return alg, table if specs else None


@keys.command("authorize")
@signer_options
@click.option(
    "--public-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The operational key to authorize (PEM). Omit it (or name a key already in the "
    "list) with --threshold to change only the threshold.",
)
@click.option("--vendor", help="Vendor DNS domain, e.g. hvac.example.com (for a new key).")
@click.option(
    "--class",
    "classes",
    multiple=True,
    metavar="MODEL:HWREV",
    help="Restrict to these model:hw-rev classes (repeatable; default: all).",
)
@click.option(
    "--roles",
    default="firmware",
    show_default=True,
    help="Comma-separated roles: firmware, keylist.",
)
@click.option("--valid-days", type=click.IntRange(1, 760), default=365, show_default=True)
@click.option("--not-before", metavar="ISO8601", help="Start of validity (default: now).")
@click.option("--name", default="", help="Human label, e.g. release-2026H2.")
@click.option(
    "--keylist",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Key list to add the key to (created at version 1 if missing).",
)
@click.option("--threshold", type=click.IntRange(1, 16), help="Set the list's k-of-n threshold.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also write the authorization document alone.",
)
@click_class_alg_options
@click.option("--json", "as_json", is_flag=True)
def authorize(
    pkcs11_uri: str | None,
    pkcs11_module: str | None,
    key_file: Path | None,
    alg_name: str | None,
    public_key: Path | None,
    vendor: str | None,
    classes: tuple[str, ...],
    roles: str,
    valid_days: int,
    not_before: str | None,
    name: str,
    keylist: Path,
    threshold: int | None,
    out: Path | None,
    key_alg: str | None,
    class_algs: tuple[str, ...],
    as_json: bool,
) -> None:
    """Root-sign an operational key's authorization and add it to the key list.

    With --threshold and no new key (no --public-key, or one already in the list) it writes
    the next version of the list with only the k-of-n threshold changed: the way to turn on
    the two-person rule once both keys are authorized.
    """
    from ..manifest.ids import class_id, vendor_id

    if public_key is None and threshold is None:
        raise UsageError(ErrorCode.USAGE, "give --public-key (a key to authorize) or --threshold")
    if public_key is None or (threshold is not None and keylist.exists()):
        key = _load_public(public_key) if public_key is not None else None
        root = load_signer(pkcs11_uri, pkcs11_module, key_file, alg_name)
        if key is None or _in_list(keylist, root.public_key, key):
            assert threshold is not None
            _set_threshold(root, keylist, threshold, as_json)
            return
    else:
        root = None
    if vendor is None:
        raise UsageError(ErrorCode.USAGE, "--vendor is required to authorize a key")
    assert public_key is not None
    try:
        role_set = frozenset(Role(r.strip()) for r in roles.split(",") if r.strip())
    except ValueError:
        raise UsageError(ErrorCode.USAGE, f"unknown role in {roles!r}") from None
    if Role.AUDIT in role_set:
        raise UsageError(
            ErrorCode.USAGE,
            "audit keys never go into the device key list: use 'keys authorize-audit'",
        )
    vid = vendor_id(vendor)
    cids = set()
    for c in classes:
        model, sep, hw = c.partition(":")
        if not sep:
            raise UsageError(ErrorCode.USAGE, f"--class must be MODEL:HWREV, got {c!r}")
        cids.add(class_id(vid, model, hw))
    key = _load_public(public_key)
    if root is None:
        root = load_signer(pkcs11_uri, pkcs11_module, key_file, alg_name)
    previous = _load_keylist(keylist, root.public_key) if keylist.exists() else None
    if previous and previous.key(key.key_id):
        raise OtaError(ErrorCode.EXISTS, f"key {key.key_id.hex()} is already in the list")
    if previous and key.key_id in previous.revoked:
        raise OtaError(ErrorCode.KEY_REVOKED, f"key {key.key_id.hex()} was revoked")
    chosen_alg, table = _class_algs_for(
        keylist, vendor, vid, frozenset(cids), key, key_alg, class_algs
    )
    nbf = _parse_time(not_before, _now())
    auth = issue_authorization(
        root,
        key,
        roles=role_set,
        scopes=[Scope(vid, frozenset(cids))],
        not_before=nbf,
        not_after=nbf + valid_days * 86400,
        name=name,
        alg=chosen_alg,
        issued_at=_now(),
    )
    auths = [a.raw for a in previous.authorizations] if previous else []
    kl = _write_new_list(
        root,
        keylist,
        [*auths, auth],
        set(previous.revoked) if previous else set(),
        threshold or (previous.threshold if previous else 1),
        previous,
    )
    if out is not None:
        atomic_write(out, auth)
    if table is not None:
        atomic_write(class_algs_path(keylist), table.to_json())
    emit(
        {
            "kid": key.key_id.hex(),
            "keylist": str(keylist),
            "keylist_version": kl.version,
            "roles": sorted(r.value for r in role_set),
            "not_after": _iso(nbf + valid_days * 86400),
            "alg": ALG_NAMES[chosen_alg],
        },
        as_json,
    )


def _in_list(keylist: Path, root: PublicKey, key: PublicKey) -> bool:
    return keylist.exists() and _load_keylist(keylist, root).key(key.key_id) is not None


def _set_threshold(root: Signer, keylist: Path, threshold: int, as_json: bool) -> None:
    """Next list version: same authorizations and revocations, new threshold (root-signed, so
    devices accept a lower one too; a list needing more keys than it holds is refused)."""
    if not keylist.exists():
        raise OtaError(ErrorCode.NOT_FOUND, f"{keylist} does not exist: authorize keys first")
    previous = _load_keylist(keylist, root.public_key)
    if previous.threshold == threshold:
        raise UsageError(ErrorCode.USAGE, f"the key list already has threshold {threshold}")
    kl = _write_new_list(
        root,
        keylist,
        [a.raw for a in previous.authorizations],
        set(previous.revoked),
        threshold,
        previous,
    )
    emit(
        {
            "keylist": str(keylist),
            "keylist_version": kl.version,
            "threshold": kl.threshold,
            "previous_threshold": previous.threshold,
        },
        as_json,
    )


@keys.command("authorize-audit")
@signer_options
@click.option(
    "--public-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="The audit-sealing key to authorize (PEM).",
)
@click.option("--vendor", required=True, help="Vendor DNS domain, e.g. hvac.example.com.")
@click.option("--valid-days", type=click.IntRange(1, 3660), default=730, show_default=True)
@click.option("--not-before", metavar="ISO8601", help="Start of validity (default: now).")
@click.option("--name", default="", help="Human label, e.g. audit-2026.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write the authorization (give it to 'audit verify --seal-authorization').",
)
@click.option("--json", "as_json", is_flag=True)
def authorize_audit(
    pkcs11_uri: str | None,
    pkcs11_module: str | None,
    key_file: Path | None,
    alg_name: str | None,
    public_key: Path,
    vendor: str,
    valid_days: int,
    not_before: str | None,
    name: str,
    out: Path,
    as_json: bool,
) -> None:
    """Root-sign an audit-sealing key's authorization (audit role only; no device sees it).

    Seals are made by this key, never by a firmware key, so that whoever can make the release
    key sign still cannot re-seal a rewritten audit history.
    """
    from ..manifest.ids import vendor_id

    key = _load_public(public_key)
    root = load_signer(pkcs11_uri, pkcs11_module, key_file, alg_name)
    if key.key_id == root.public_key.key_id:
        raise UsageError(ErrorCode.USAGE, "the root key cannot be its own audit-sealing key")
    nbf = _parse_time(not_before, _now())
    auth = issue_authorization(
        root,
        key,
        roles=frozenset({Role.AUDIT}),
        scopes=[Scope(vendor_id(vendor))],
        not_before=nbf,
        not_after=nbf + valid_days * 86400,
        name=name,
        issued_at=_now(),
    )
    atomic_write(out, auth)
    emit(
        {
            "kid": key.key_id.hex(),
            "authorization": str(out),
            "roles": [Role.AUDIT.value],
            "not_after": _iso(nbf + valid_days * 86400),
        },
        as_json,
    )


@keys.command("revoke")
@signer_options
@click.option(
    "--keylist", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True
)
@click.option("--kid", required=True, help="Key id (hex) to revoke.")
@click.option("--json", "as_json", is_flag=True)
def revoke(
    pkcs11_uri: str | None,
    pkcs11_module: str | None,
    key_file: Path | None,
    alg_name: str | None,
    keylist: Path,
    kid: str,
    as_json: bool,
) -> None:
    """Root-sign a new key list that removes and revokes a key."""
    try:
        kid_bytes = bytes.fromhex(kid)
    except ValueError:
        raise UsageError(ErrorCode.USAGE, "--kid must be hex") from None
    root = load_signer(pkcs11_uri, pkcs11_module, key_file, alg_name)
    previous = _load_keylist(keylist, root.public_key)
    if previous.key(kid_bytes) is None and kid_bytes not in previous.revoked:
        raise OtaError(ErrorCode.KEY_NOT_FOUND, f"key {kid} is not in the key list")
    auths = [a.raw for a in previous.authorizations if a.key_id != kid_bytes]
    kl = _write_new_list(
        root, keylist, auths, set(previous.revoked) | {kid_bytes}, previous.threshold, previous
    )
    emit({"revoked": kid, "keylist_version": kl.version}, as_json)


@keys.command("list")
@click.option("--keylist", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--root-public", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--trust",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A trust bundle (instead of --keylist + --root-public).",
)
@click.option("--json", "as_json", is_flag=True)
def list_keys(
    keylist: Path | None, root_public: Path | None, trust: Path | None, as_json: bool
) -> None:
    """Show a (verified) key list: keys, roles, validity, revocations."""
    if trust is not None:
        bundle = TrustBundle.load(read_limited(trust, MAX_KEYLIST + 4096))
        kl = bundle.store().keylist
    elif keylist is not None and root_public is not None:
        kl = _load_keylist(keylist, _load_public(root_public))
    else:
        raise UsageError(ErrorCode.USAGE, "give --trust, or --keylist with --root-public")
    emit(_describe(kl, _now()), as_json, _render)


@keys.command("export-trust")
@click.option(
    "--root-public", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True
)
@click.option(
    "--keylist", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True
)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--json", "as_json", is_flag=True)
def export_trust(root_public: Path, keylist: Path, out: Path, as_json: bool) -> None:
    """Write the bundle devices are provisioned with (root public key + key list)."""
    root = _load_public(root_public)
    bundle = TrustBundle(root, read_limited(keylist, MAX_KEYLIST))
    bundle.store()  # refuse to export anything a device would refuse
    atomic_write(out, bundle.to_bytes())
    emit(
        {
            "bundle": str(out),
            "root_kid": root.key_id.hex(),
            "otp_hash": root.thumbprint.hex(),
            "keylist_version": bundle.store().version,
            "sha256": bundle.fingerprint(),
        },
        as_json,
    )
