"""``otaguard agent``: the update agent on a real Linux device (docs/device-linux.md).

Boot order (the shipped systemd units): ``boot-check`` first (first-boot verification of
whatever GRUB started; reboots into the right slot when needed), then ``self-test`` before
``boot-complete.target``, then ``mark-good`` (or ``mark-bad`` on failure), then ``run``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import click
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from ..device.device import Provisioning
from ..device.linux.config import AgentConfig
from ..device.linux.service import log, reboot, run, self_test_of
from ..device.linux.system import LinuxDevice, RebootRequested, open_storage, write_outbox
from ..device.storage import Identity
from ..device.transport import LocalFileTransport, Transport
from ..device.url_transport import UrlTransport
from ..errors import DeviceError, ErrorCode, UsageError
from ..fsutil import atomic_write, read_limited
from ..manifest.ids import class_id, vendor_id
from ..manifest.verify import MAX_ENVELOPE_SIZE
from ..trust.bundle import MAX_BUNDLE, TrustBundle
from .common import emit

MAX_PEM = 16 * 1024
MAX_AUTH = 64  # a TPM password: at most the name-algorithm digest size
TPM_KEY_FILE = "identity-key.tss2"  # the TPM-wrapped key until its certificate is stored

config_option = click.option(
    "--config",
    "config_path",
    default="/etc/otaguard/agent.toml",
    show_default=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Agent configuration (TOML).",
)


def _chunks(path: Path, n: int = 1024 * 1024) -> Any:
    with path.open("rb") as f:
        while chunk := f.read(n):
            yield chunk


@click.group()
def agent() -> None:
    """The device agent for Linux devices with A/B partitions and GRUB or U-Boot."""


@agent.command("provision")
@config_option
@click.option(
    "--trust", "trust_path", required=True, type=click.Path(dir_okay=False, path_type=Path)
)
@click.option("--vendor", required=True)
@click.option("--model", required=True)
@click.option("--hw-rev", required=True)
@click.option("--factory-image", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--factory-manifest", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--identity-key", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--identity-cert", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--server-ca", type=click.Path(dir_okay=False, path_type=Path), help="Fleet CA PEM.")
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write the state here instead of the config's (a data-partition image).",
)
@click.option("--slot-a", help="Override the config's slot A device (e.g. a partition image).")
@click.option("--slot-b", help="Override the config's slot B device.")
@click.option(
    "--grubenv",
    nargs=2,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Override the two env copy paths (an ESP being built).",
)
@click.option(
    "--tpm-owner-auth",
    type=click.Path(dir_okay=False, path_type=Path),
    help="File with the TPM owner password (device.store = tpm; default: empty).",
)
@click.option(
    "--tpm-new-owner-auth",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Take ownership: set the TPM owner password to this file's contents first.",
)
@click.option("--serial", help="Device serial for the CSR (device.store = tpm).")
@click.option(
    "--csr-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write the CSR of the TPM-generated identity key here (device.store = tpm).",
)
@click.option(
    "--fw-env-config",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Override the config's fw_env.config (U-Boot: env copies in files being built).",
)
@click.option("--json", "as_json", is_flag=True)
def provision_cmd(
    config_path: Path,
    trust_path: Path,
    vendor: str,
    model: str,
    hw_rev: str,
    factory_image: Path,
    factory_manifest: Path,
    identity_key: Path | None,
    identity_cert: Path | None,
    server_ca: Path | None,
    state_dir: Path | None,
    slot_a: str | None,
    slot_b: str | None,
    grubenv: tuple[Path, Path] | None,
    tpm_owner_auth: Path | None,
    tpm_new_owner_auth: Path | None,
    serial: str | None,
    csr_out: Path | None,
    fw_env_config: Path | None,
    as_json: bool,
) -> None:
    """Factory step: identity facts, trust store, counters, the factory image in slot A.

    With ``device.store = "tpm"``: takes ownership (``--tpm-new-owner-auth``) or uses the
    owner password given, creates the storage root key and the identity key inside the TPM,
    writes and locks the root anchor, creates the counters, and writes the CSR for enrollment
    (``--serial``, ``--csr-out``); `agent install-cert` stores the certificate."""
    cfg = AgentConfig.load(config_path)
    over: dict[str, Any] = {}
    if state_dir is not None:
        over["state_dir"] = state_dir
    if slot_a:
        over["slot_a"] = slot_a
    if slot_b:
        over["slot_b"] = slot_b
    if grubenv:
        over["grubenv"] = (Path(grubenv[0]), Path(grubenv[1]))
    if fw_env_config is not None:
        over["fw_env_config"] = fw_env_config
    cfg = dataclasses.replace(cfg, **over)
    bundle = TrustBundle.load(read_limited(trust_path, MAX_BUNDLE))
    vid = vendor_id(vendor)
    identity = None
    tpm = cfg.store == "tpm"
    if tpm and (identity_key or identity_cert):
        raise UsageError(ErrorCode.USAGE, "a TPM device makes its own key: use --csr-out")
    if tpm and not (serial and csr_out):
        raise UsageError(ErrorCode.USAGE, "device.store = tpm needs --serial and --csr-out")
    if not tpm and (tpm_owner_auth or tpm_new_owner_auth or csr_out):
        raise UsageError(
            ErrorCode.USAGE, "the --tpm-* and --csr-out options need device.store = tpm"
        )
    if identity_key or identity_cert:
        if not (identity_key and identity_cert):
            raise UsageError(ErrorCode.USAGE, "give both --identity-key and --identity-cert")
        identity = Identity(
            read_limited(identity_key, MAX_PEM), read_limited(identity_cert, MAX_PEM)
        )
    prov = Provisioning(
        bundle,
        vid,
        class_id(vid, model, hw_rev),
        model,
        hw_rev,
        read_limited(factory_manifest, MAX_ENVELOPE_SIZE),
        identity,
    )
    cfg.state_dir.mkdir(parents=True, exist_ok=True)
    owner = read_limited(tpm_owner_auth, MAX_AUTH) if tpm_owner_auth else b""
    dev = LinuxDevice(cfg, running=0, provisioning=True, tpm_owner_auth=owner)
    if dev.storage.otp() is not None:
        raise DeviceError(ErrorCode.OTP_WRITTEN, f"{cfg.state_dir} is already provisioned")
    if dev.tpm is not None:
        from ..device.linux.tpm import ensure_srk

        dev.tpm.set_owner_auth(owner)
        if tpm_new_owner_auth is not None:
            owner = read_limited(tpm_new_owner_auth, MAX_AUTH)
            dev.tpm.take_ownership(owner)
            assert dev.tpm_store is not None
            dev.tpm_store.owner_auth = owner
        ensure_srk(dev.tpm, owner)
    dev.provision(prov, _chunks(factory_image))
    if dev.tpm is not None and serial and csr_out:
        from ..device.linux.tpm import create_identity_key
        from ..device.linux.tpmtls import TpmKey, tpm_csr

        blob = create_identity_key(dev.tpm)
        atomic_write(cfg.state_dir / TPM_KEY_FILE, blob, mode=0o600)
        key = TpmKey(dev.tpm, blob)
        try:
            atomic_write(csr_out, tpm_csr(key, serial))
        finally:
            key.close()
    if server_ca is not None:
        atomic_write(
            state_dir / "server-ca.pem" if state_dir else cfg.server_ca,
            read_limited(server_ca, MAX_PEM),
        )
    emit(dev.status(), as_json)


@agent.command("install-cert")
@config_option
@click.option("--cert", "cert_path", required=True, type=click.Path(dir_okay=False, path_type=Path))
def install_cert_cmd(config_path: Path, cert_path: Path) -> None:
    """Factory step after enrollment: store the certificate issued for the TPM key's CSR."""
    cfg = AgentConfig.load(config_path)
    if cfg.store != "tpm":
        raise UsageError(ErrorCode.USAGE, "install-cert is for device.store = tpm")
    from ..device.linux.tpm import Tpm, TpmStore
    from ..device.linux.tpmtls import blob_spki

    tpm = Tpm(cfg.tpm_tcti)
    try:
        storage = open_storage(cfg.state_dir, TpmStore(tpm))
        storage.require_otp()  # provisioned, and the TPM's anchor is as provisioning left it
        blob = read_limited(cfg.state_dir / TPM_KEY_FILE, MAX_PEM)
        cert_pem = read_limited(cert_path, MAX_PEM)
        try:
            cert = x509.load_pem_x509_certificate(cert_pem)
        except ValueError:
            raise DeviceError(
                ErrorCode.MALFORMED, f"{cert_path} is not a PEM certificate"
            ) from None
        spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
        if spki != blob_spki(blob):
            raise DeviceError(ErrorCode.CERT, "the certificate is not for the TPM identity key")
        storage.write_identity(Identity(blob, cert_pem))
    finally:
        tpm.close()
    emit({"identity": cert.subject.rfc4514_string(), "storage": "tpm"}, False)


@agent.command("boot-check")
@config_option
def boot_check_cmd(config_path: Path) -> None:
    """First-boot verification of the running slot; reboots into another slot if needed."""
    cfg = AgentConfig.load(config_path)
    dev = LinuxDevice(cfg)
    try:
        result = dev.assess()
    except RebootRequested as req:
        reboot(cfg, req.detail)
        return
    extra = f" reverted={result.reverted}" if result.reverted else ""
    log(f"boot-check slot={result.slot_name} mode={result.mode} version={result.version}{extra}")


@agent.command("self-test")
@config_option
def self_test_cmd(config_path: Path) -> None:
    """Run the configured self-test commands (exit 1 if one fails)."""
    cfg = AgentConfig.load(config_path)
    dev = LinuxDevice(cfg)
    cur = dev.bootloader.current
    if cur is None:
        raise DeviceError(ErrorCode.STATE, "the boot check has not run on this boot")
    ok = self_test_of(cfg)(cur)
    log(f"self-test {'passed' if ok else 'failed'} slot={cur.slot_name} mode={cur.mode}")
    if not ok:
        sys.exit(1)


@agent.command("mark-good")
@config_option
def mark_good_cmd(config_path: Path) -> None:
    """Confirm a test boot (after its self-test passed); a no-op on a normal boot."""
    cfg = AgentConfig.load(config_path)
    dev = LinuxDevice(cfg)
    cur = dev.bootloader.current
    if cur is None or cur.mode != "test":
        log("mark-good: not a test boot, nothing to confirm")
        return
    dev.confirm()
    write_outbox(cfg.state_dir, {"event": "confirmed", "version": cur.version})
    log(f"mark-good: slot {cur.slot_name} version {cur.version} confirmed")


@agent.command("mark-bad")
@config_option
def mark_bad_cmd(config_path: Path) -> None:
    """Reject a test boot (its self-test failed) and reboot into the previous slot."""
    cfg = AgentConfig.load(config_path)
    dev = LinuxDevice(cfg)
    cur = dev.bootloader.current
    if cur is None or cur.mode != "test":
        log("mark-bad: not a test boot, nothing to reject")
        return
    dev.reject(ErrorCode.SELF_TEST)
    write_outbox(
        cfg.state_dir,
        {"event": "reverted", "error": ErrorCode.SELF_TEST.value, "version": cur.version},
    )
    reboot(cfg, f"slot {cur.slot_name} failed its self-test")


@agent.command("run")
@config_option
@click.option("--once", is_flag=True, help="One poll cycle, then exit.")
def run_cmd(config_path: Path, once: bool) -> None:
    """Poll the update server over mTLS, install, reboot; the systemd service."""
    run(AgentConfig.load(config_path), once=once)


@agent.command("install")
@config_option
@click.argument("source")
@click.option(
    "--ca",
    "ca_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="CA file for an https:// source (default: the system's store).",
)
@click.option("--json", "as_json", is_flag=True)
def install_cmd(config_path: Path, source: str, ca_file: Path | None, as_json: bool) -> None:
    """Install a release directory (manifest.suit + image.bin) from a path (a USB stick) or
    an http(s):// URL, like `rauc install`. The manifest is verified before any image byte is
    read; the image goes into the inactive slot and the next reboot test-boots it."""
    cfg = AgentConfig.load(config_path)
    transport: Transport
    if source.startswith(("http://", "https://")):
        transport = UrlTransport(source, ca_file=ca_file, timeout=cfg.timeout)
    else:
        path = Path(source)
        if not path.is_dir():
            raise UsageError(ErrorCode.USAGE, f"{source} is not a release directory or URL")
        manifest, image = path / "manifest.suit", path / "image.bin"
        if not manifest.is_file() or not image.is_file():
            raise UsageError(ErrorCode.USAGE, f"{source} holds no manifest.suit and image.bin")
        transport = LocalFileTransport(manifest, image)
    dev = LinuxDevice(cfg)
    if dev.bootloader.current is None:
        dev.assess()
    result = dev.install(transport)
    emit(result.as_dict(), as_json)


@agent.command("status")
@config_option
@click.option("--json", "as_json", is_flag=True)
def status_cmd(config_path: Path, as_json: bool) -> None:
    """Slots, versions, counters, boot environment, last error."""
    emit(LinuxDevice(AgentConfig.load(config_path)).status(), as_json)
