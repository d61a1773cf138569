"""``otaguard device``: a simulated device in a directory (flash image + layout).

``init`` is the factory: it fuses the trust bundle's root hash and the product identity into
OTP, stores the key list, and writes the factory firmware into slot A. The factory firmware is
either a signed release (``--factory-manifest``, e.g. from ``release create``) or, for labs and
demos, signed on the spot with ``--key-file``/``--pkcs11-uri`` (the key must be an operational
firmware key in the bundle, otherwise the device refuses its own factory image).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from ..crypto.algorithms import HashAlg
from ..device.device import Device, Provisioning
from ..device.layout import LayoutConfig
from ..device.selftest import SelfTest, command_self_test, constant
from ..device.storage import Identity
from ..device.transport import LocalFileTransport
from ..errors import ErrorCode, UsageError
from ..fsutil import read_limited
from ..manifest.build import build_envelope
from ..manifest.ids import class_id, vendor_id
from ..manifest.model import ManifestInfo
from ..manifest.verify import MAX_ENVELOPE_SIZE
from ..trust.bundle import MAX_BUNDLE, TrustBundle
from .common import emit, load_signer, signer_options

REPORT_LOG = "reports.jsonl"
MAX_IDENTITY_BLOB = 6 * 1024


def _file_chunks(path: Path, n: int = 64 * 1024) -> Iterator[bytes]:
    with path.open("rb") as f:
        while chunk := f.read(n):
            yield chunk


def _digest_file(path: Path) -> tuple[bytes, int]:
    h = hashlib.sha256()
    size = 0
    for chunk in _file_chunks(path):
        h.update(chunk)
        size += len(chunk)
    return h.digest(), size


dir_option = click.option(
    "--dir",
    "directory",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory holding the simulated device (device.json + flash.bin).",
)


@click.group()
def device() -> None:
    """Simulated A/B device: provision, install offline, boot, inspect."""


@device.command("init")
@dir_option
@click.option(
    "--trust",
    "trust_path",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Trust bundle (keys export-trust).",
)
@click.option("--vendor", required=True, help="Vendor DNS domain (vendor-id = UUID5 of it).")
@click.option("--model", required=True)
@click.option("--hw-rev", required=True)
@click.option("--version", "fw_version", required=True, help="Factory firmware version.")
@click.option("--factory-image", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--factory-manifest",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Signed manifest for the factory image; omit to sign one now with a key option.",
)
@click.option(
    "--sequence",
    default=1,
    show_default=True,
    help="Sequence number when signing the factory manifest here.",
)
@click.option(
    "--security-counter", default=0, show_default=True, help="Security counter when signing here."
)
@click.option(
    "--identity-key",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Device key blob to store.",
)
@click.option(
    "--identity-cert",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Device certificate blob to store.",
)
@click.option("--slot-size", default=1024 * 1024, show_default=True)
@click.option("--sector-size", default=4096, show_default=True)
@click.option("--page-size", default=256, show_default=True)
@click.option("--manifest-size", default=8192, show_default=True, help="Manifest area per slot.")
@signer_options
@click.option("--json", "as_json", is_flag=True)
def init_cmd(
    directory: Path,
    trust_path: Path,
    vendor: str,
    model: str,
    hw_rev: str,
    fw_version: str,
    factory_image: Path,
    factory_manifest: Path | None,
    sequence: int,
    security_counter: int,
    identity_key: Path | None,
    identity_cert: Path | None,
    slot_size: int,
    sector_size: int,
    page_size: int,
    manifest_size: int,
    pkcs11_uri: str | None,
    pkcs11_module: str | None,
    key_file: Path | None,
    alg_name: str | None,
    as_json: bool,
) -> None:
    """Provision a new simulated device (the factory step)."""
    bundle = TrustBundle.load(read_limited(trust_path, MAX_BUNDLE))
    vid = vendor_id(vendor)
    cid = class_id(vid, model, hw_rev)
    if factory_manifest is not None:
        if pkcs11_uri or key_file:
            raise UsageError(ErrorCode.USAGE, "give --factory-manifest or a signing key, not both")
        manifest = read_limited(factory_manifest, MAX_ENVELOPE_SIZE)
    else:
        if not (pkcs11_uri or key_file):
            raise UsageError(
                ErrorCode.USAGE, "give --factory-manifest, or --key-file/--pkcs11-uri to sign one"
            )
        digest, size = _digest_file(factory_image)
        info = ManifestInfo(
            sequence_number=sequence,
            vendor_id=vid,
            class_id=cid,
            digest_alg=HashAlg.SHA256,
            image_digest=digest,
            image_size=size,
            version=fw_version,
            min_version=None,
            security_counter=security_counter,
            expires=None,
            uri=None,
            text={"model": model, "hw_rev": hw_rev, "description": "factory image"},
        )
        manifest = build_envelope(
            info, [load_signer(pkcs11_uri, pkcs11_module, key_file, alg_name)]
        )
    identity = None
    if identity_key or identity_cert:
        if not (identity_key and identity_cert):
            raise UsageError(ErrorCode.USAGE, "give both --identity-key and --identity-cert")
        identity = Identity(
            read_limited(identity_key, MAX_IDENTITY_BLOB),
            read_limited(identity_cert, MAX_IDENTITY_BLOB),
        )
    cfg = LayoutConfig(
        sector_size=sector_size,
        page_size=page_size,
        slot_size=slot_size,
        manifest_size=manifest_size,
    )
    prov = Provisioning(bundle, vid, cid, model, hw_rev, manifest, identity)
    with Device.create(directory, cfg, prov, _file_chunks(factory_image)) as dev:
        status = dev.status()
        running = status["slots"][0]
        if running.get("version") != fw_version:
            raise UsageError(
                ErrorCode.USAGE,
                f"factory manifest is version {running.get('version')}, not {fw_version}",
            )
    emit(status, as_json, _status_text)


@device.command("install")
@dir_option
@click.option(
    "--manifest", "manifest_path", required=True, type=click.Path(dir_okay=False, path_type=Path)
)
@click.option("--image", "image_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--patch",
    "patch_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Delta patch. Without --image, --manifest is its delta manifest.",
)
@click.option(
    "--delta-manifest",
    "delta_manifest_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Delta manifest for --patch, tried first; --manifest/--image are the fallback.",
)
@click.option("--json", "as_json", is_flag=True)
def install_cmd(
    directory: Path,
    manifest_path: Path,
    image_path: Path | None,
    patch_path: Path | None,
    delta_manifest_path: Path | None,
    as_json: bool,
) -> None:
    """Offline install (USB stick): verify, check, stream into the inactive slot, mark pending.

    Full image: --manifest M --image I. Delta: --manifest DM --patch P. Delta with fallback:
    --delta-manifest DM --patch P --manifest M --image I.
    """
    if image_path is None and patch_path is None:
        raise UsageError(ErrorCode.USAGE, "give --image, --patch, or both")
    if delta_manifest_path is not None and (patch_path is None or image_path is None):
        raise UsageError(ErrorCode.USAGE, "--delta-manifest needs --patch and --image")
    transport = LocalFileTransport(
        manifest_path,
        image_path,
        patch=patch_path,
        delta_manifest=delta_manifest_path,
        report_log=directory / REPORT_LOG,
    )
    with Device(directory) as dev:
        result = dev.install(transport)
    emit(result.as_dict(), as_json)


@device.command("boot")
@dir_option
@click.option(
    "--self-test",
    "self_test",
    type=click.Choice(["pass", "fail"]),
    help="Outcome of the application's health check after a test boot.",
)
@click.option(
    "--self-test-cmd", metavar="CMD", help="Shell command as health check (exit 0 = healthy)."
)
@click.option("--json", "as_json", is_flag=True)
def boot_cmd(
    directory: Path, self_test: str | None, self_test_cmd: str | None, as_json: bool
) -> None:
    """Power on: verify and boot; a new image runs in test mode until its self-test confirms it.

    Without --self-test/--self-test-cmd a test boot stays unconfirmed (the watchdog reverts it
    after a few such boots).
    """
    if self_test and self_test_cmd:
        raise UsageError(ErrorCode.USAGE, "give --self-test or --self-test-cmd, not both")
    check: SelfTest | None = None
    if self_test is not None:
        check = constant(self_test == "pass")
    elif self_test_cmd:
        check = command_self_test(self_test_cmd)
    with Device(directory) as dev:
        r = dev.boot()
        out: dict[str, Any] = {
            "slot": r.slot_name,
            "mode": r.mode,
            "version": r.version,
            "reverted": r.reverted,
            "self_test": None,
        }
        if r.mode == "test" and check is not None:
            out["self_test"] = dev.run_self_test(check)
            if out["self_test"] == "reverted":
                again = dev.boot()  # the reset after a failed self-test
                out.update(slot=again.slot_name, mode=again.mode, version=again.version)
            else:
                out["mode"] = "normal"
    emit(out, as_json)


@device.command("status")
@dir_option
@click.option("--json", "as_json", is_flag=True)
def status_cmd(directory: Path, as_json: bool) -> None:
    """Slots, versions, counters, key-list version, last error code."""
    with Device(directory) as dev:
        status = dev.status()
    emit(status, as_json, _status_text)


@device.command("update-keys")
@dir_option
@click.option(
    "--update", "update_path", required=True, type=click.Path(dir_okay=False, path_type=Path)
)
def update_keys_cmd(directory: Path, update_path: Path) -> None:
    """Install a signed key-list update into the device's trust store."""
    with Device(directory) as dev:
        version = dev.apply_keylist_update(read_limited(update_path, MAX_BUNDLE))
    click.echo(f"key list now at version {version}")


def _status_text(s: dict[str, Any]) -> str:
    bs = s["boot_state"]
    lines = [
        f"device      {s['model']} {s['hw_rev']}",
        f"active      {bs['active']}   pending {bs['pending'] or '-'}   tries {bs['tries']}",
        "counters    " + "  ".join(f"{k}={v}" for k, v in s["counters"].items()),
        f"key list    v{s.get('keylist_version')}",
        f"last error  {s['last_error'] or '-'}",
    ]
    for slot in s["slots"]:
        if slot.get("valid"):
            lines.append(
                f"slot {slot['slot']}      {slot['version']} (counter {slot['security_counter']},"
                f" seq {slot['sequence_number']}, {slot['image_size']} bytes)"
            )
        else:
            lines.append(f"slot {slot['slot']}      invalid ({slot.get('error')})")
    if s["suspects"]:
        lines.append(f"suspects    {len(s['suspects'])} source(s) awaiting report")
    return "\n".join(lines)
