"""``otaguard release create``: build output → signed release directory.

Two ways to sign: in-process with an HSM key (``--pkcs11-uri``) or a development key file, or
remotely via the signing service (``--signing-url``, token from ``$OTAGUARD_SIGNING_TOKEN``),
which is what CI uses so that it never holds a key. Either way the signing goes through the
same policy / audit path (:class:`~otaguard.signing.service.SigningService`).
"""

from __future__ import annotations

import getpass
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from ..crypto.algorithms import HashAlg, hash_alg
from ..crypto.cose import Signer
from ..crypto.keys import PublicKey
from ..errors import ErrorCode, UsageError
from ..fsutil import read_limited
from ..manifest.class_algs import MAX_TABLE, ClassAlgs, envelope_algs
from ..mcuboot.image import DEFAULT_TRAILER, Geometry
from ..signing.audit import DEFAULT_SEAL_EVERY, AuditHead, AuditLog
from ..signing.audit_key import check_separate
from ..signing.client import TOKEN_ENV, SigningClient
from ..signing.policy import Policy, Requester, Role, SigningRequest
from ..signing.release import build_release, parse_expires
from ..signing.release_deltas import DEFAULT_DELTA_FACTOR
from ..signing.release_mcuboot import McubootJob
from ..signing.service import SigningService
from ..signing.state import SigningState
from .common import close_signers, emit, load_signer, load_signers, multi_signer_options
from .cosign_flow import CosignFlow

MAX_PEM = 16 * 1024
MAX_POLICY = 256 * 1024


@click.group()
def release() -> None:
    """Create signed releases (SUIT manifest + image + summary)."""


def _audit_sealer(
    pkcs11_uri: str | None, pkcs11_module: str | None, key_file: Path | None
) -> Signer | None:
    if not pkcs11_uri and key_file is None:
        click.echo(
            "WARNING: no audit-sealing key (--audit-seal-pkcs11-uri): the audit records of "
            "this run are hash-chained but not sealed",
            err=True,
        )
        return None
    return load_signer(pkcs11_uri, pkcs11_module, key_file, None)


def _summary_text(s: dict[str, Any]) -> str:
    return (
        (
            f"release {s['model']}/{s['hw_rev']} {s['version']} (sequence {s['sequence']}, "
            f"security counter {s['security_counter']})\n"
            f"  image     {s['image']['size']} bytes {s['image']['digest_alg']}:"
            f"{s['image']['digest']}\n"
            f"  manifest  {s['manifest']['size']} bytes, signed by "
            f"{', '.join(s['signer_key_ids'])}\n"
            f"  audit     record {s['audit']['seq']} ({s['signed_by']})"
        )
        + "".join(
            f"\n  delta     from {d['base_version']}: {d['patch']} {d['patch_size']} bytes "
            f"({d['pct_of_full']}% of the image, {d['pct_of_xz']}% of xz -9e), "
            f"{d['manifest']['file']}"
            for d in s.get("deltas", [])
        )
        + "".join(
            f"\n  no delta  from {d['base_version']}: {d['reason']}"
            for d in s.get("deltas_skipped", [])
        )
        + (
            f"\n  mcuboot   {s['mcuboot']['file']} {s['mcuboot']['size']} bytes, version "
            f"{s['mcuboot']['version']}, SEC_CNT {s['mcuboot']['security_counter']}, "
            f"TLV overhead {s['mcuboot']['tlv_overhead']} bytes"
            if "mcuboot" in s
            else ""
        )
    )


@release.command("create")
@click.option("--image", type=click.Path(dir_okay=False, path_type=Path), required=True)
@click.option("--vendor", required=True, help="Vendor DNS domain (vendor-id = UUID5 of it).")
@click.option("--model", required=True)
@click.option("--hw-rev", required=True, help="Hardware revision (class-id = model + hw-rev).")
@click.option("--version", "version", required=True, metavar="X.Y.Z")
@click.option("--min-version", metavar="X.Y.Z", help="Minimum running version required.")
@click.option("--security-counter", type=click.IntRange(min=0), required=True)
@click.option("--expires", metavar="WHEN", help="+30d, +12h, YYYY-MM-DD or ISO datetime.")
@click.option("--uri", help="Where devices fetch the image.")
@click.option("--description", help="Human-readable text carried in the manifest.")
@click.option("--digest-alg", default="sha256", show_default=True, help="sha256 or sha384.")
@click.option(
    "--downgrade", is_flag=True, help="Request a version downgrade (security officer only)."
)
@click.option(
    "--fast-forward",
    is_flag=True,
    help="Authorize a security-counter or major-version jump beyond the policy's step "
    "(security officer only).",
)
@multi_signer_options
@click.option("--signing-url", metavar="URL", help=f"Signing service; token from ${TOKEN_ENV}.")
@click.option(
    "--cosign",
    is_flag=True,
    help="With --signing-url: file a co-signing request (two-person rule) and wait until "
    "enough officers approved it.",
)
@click.option(
    "--cosign-id",
    metavar="ID",
    help="With --signing-url: pick up a co-signing request filed earlier (same image and "
    "options; implies --cosign).",
)
@click.option(
    "--wait",
    "wait_s",
    type=click.IntRange(min=0),
    default=3600,
    show_default=True,
    help="Seconds to wait for the approvals (0: file and return; E_PENDING).",
)
@click.option(
    "--poll",
    "poll_s",
    type=click.FloatRange(min=0.1),
    default=5.0,
    show_default=True,
    help="Seconds between checks while waiting.",
)
@click.option(
    "--signing-ca",
    type=click.Path(dir_okay=False, path_type=Path),
    help="CA certificate for the signing service's TLS.",
)
@click.option(
    "--trust-key",
    type=click.Path(dir_okay=False, path_type=Path),
    multiple=True,
    help="Public key (PEM) the remote signature must verify with (pinning).",
)
@click.option(
    "--audit-log",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Audit log for in-process signing (required with a local key).",
)
@click.option(
    "--state",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Signing state DB (default: AUDIT_LOG.state.sqlite).",
)
@click.option("--policy", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--requester", help="Requester id for the local policy (default local:$USER).")
@click.option("--seal-every", type=click.IntRange(min=1), default=DEFAULT_SEAL_EVERY)
@click.option(
    "--audit-seal-pkcs11-uri",
    metavar="URI",
    help="HSM key that seals the local audit log ('keys authorize-audit'); never a release key.",
)
@click.option(
    "--audit-seal-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Development only: an encrypted key file that seals the local audit log.",
)
@click.option(
    "--delta-from",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    multiple=True,
    help="Earlier release directory to make a delta from (repeatable).",
)
@click.option(
    "--delta-factor",
    type=click.FloatRange(min=0, max=1, min_open=True),
    default=DEFAULT_DELTA_FACTOR,
    show_default=True,
    help="Publish a delta only if patch <= FACTOR x xz -9e of the full image.",
)
@click.option("--patch-uri-prefix", help="Patch URI = PREFIX + patch file name (optional).")
@click.option(
    "--class-algs",
    "class_algs_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Class algorithm table (KEYLIST.class-algs.json, written by `keys authorize "
    "--class-alg`): a signer whose algorithm the class cannot verify is refused (E_ALGORITHM) "
    "before it signs.",
)
@click.option(
    "--format",
    "formats",
    type=click.Choice(["suit", "mcuboot"]),
    multiple=True,
    help="Artifacts to write: the SUIT manifest always; 'mcuboot' also writes the release's "
    "MCUboot image (image.mcuboot.bin), signed for the same request by the same key, policy "
    "and audit log.",
)
@click.option(
    "--slot-size",
    type=click.IntRange(min=1),
    help="MCUboot slot size in bytes: an image (header + image + TLVs + trailer) that does not "
    "fit is refused (E_SLOT_FULL) before anything is signed.",
)
@click.option(
    "--mcuboot-header-size",
    type=click.IntRange(min=32, max=0xFFFF),
    default=32,
    show_default=True,
    help="MCUboot header size (imgtool -H; Zephyr commonly uses 0x200).",
)
@click.option(
    "--mcuboot-trailer-size",
    type=click.IntRange(min=0),
    default=DEFAULT_TRAILER,
    show_default=True,
    help="Bytes the slot keeps for MCUboot's swap trailer.",
)
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True)
@click.option("--json", "as_json", is_flag=True)
def create(
    image: Path,
    vendor: str,
    model: str,
    hw_rev: str,
    version: str,
    min_version: str | None,
    security_counter: int,
    expires: str | None,
    uri: str | None,
    description: str | None,
    digest_alg: str,
    downgrade: bool,
    fast_forward: bool,
    pkcs11_uris: tuple[str, ...],
    pkcs11_module: str | None,
    key_files: tuple[Path, ...],
    alg_name: str | None,
    signing_url: str | None,
    cosign: bool,
    cosign_id: str | None,
    wait_s: int,
    poll_s: float,
    signing_ca: Path | None,
    trust_key: tuple[Path, ...],
    audit_log: Path | None,
    state: Path | None,
    policy: Path | None,
    requester: str | None,
    seal_every: int,
    audit_seal_pkcs11_uri: str | None,
    audit_seal_key_file: Path | None,
    delta_from: tuple[Path, ...],
    delta_factor: float,
    patch_uri_prefix: str | None,
    class_algs_file: Path | None,
    formats: tuple[str, ...],
    slot_size: int | None,
    mcuboot_header_size: int,
    mcuboot_trailer_size: int,
    out: Path,
    as_json: bool,
) -> None:
    """Sign IMAGE for one model/hardware revision and write the release directory OUT.

    Several --pkcs11-uri/--key-file options sign with every key (a key list whose threshold
    asks for k signatures needs k distinct keys); the same key twice is E_DUPLICATE_SIGNER.
    """
    now = int(time.time())
    class_check = _class_check(class_algs_file, vendor, model, hw_rev)
    alg: HashAlg = hash_alg(digest_alg)
    expires_at = parse_expires(expires, now)
    pins = [PublicKey.from_pem(read_limited(p, MAX_PEM)) for p in trust_key]
    deltas: dict[str, Any] = {
        "delta_from": list(delta_from),
        "delta_factor": delta_factor,
        "patch_uri_prefix": patch_uri_prefix,
    }

    def make_request(digest: bytes, size: int) -> SigningRequest:
        req = SigningRequest(
            image_digest=digest,
            digest_alg=alg,
            image_size=size,
            vendor=vendor,
            model=model,
            hw_rev=hw_rev,
            version=version,
            min_version=min_version,
            security_counter=security_counter,
            expires=expires_at,
            uri=uri,
            description=description,
            downgrade=downgrade,
            fast_forward=fast_forward,
        )
        req.validate()
        return req

    want_mcuboot = "mcuboot" in formats
    geometry = Geometry(slot_size, mcuboot_header_size, mcuboot_trailer_size)
    if not want_mcuboot and slot_size is not None:
        raise UsageError(ErrorCode.USAGE, "--slot-size is for --format mcuboot")
    if want_mcuboot and (cosign or cosign_id):
        raise UsageError(ErrorCode.USAGE, "--format mcuboot is not supported with co-signing")
    if (cosign or cosign_id) and not signing_url:
        raise UsageError(ErrorCode.USAGE, "--cosign/--cosign-id need --signing-url")
    if (cosign or cosign_id) and class_check is not None:
        # The officers' keys are only known once the request is filed; check them with
        # 'keys authorize --class-alg' instead.
        raise UsageError(ErrorCode.USAGE, "--class-algs is not supported with co-signing")
    if signing_url and (audit_seal_pkcs11_uri or audit_seal_key_file):
        raise UsageError(ErrorCode.USAGE, "--signing-url: the service seals its own audit log")
    if signing_url and (pkcs11_uris or key_files or audit_log or policy or state):
        raise UsageError(
            ErrorCode.USAGE,
            "--signing-url excludes local signing options (--pkcs11-uri/--key-file/"
            "--audit-log/--policy/--state): the service signs and audits",
        )
    if signing_url and (cosign or cosign_id):
        with SigningClient(signing_url, os.environ.get(TOKEN_ENV, ""), ca_file=signing_ca) as cl:
            flow = CosignFlow(cl, cosign_id, wait=wait_s, poll=poll_s)
            if cosign_id:
                expires_at = flow.filed_expires()  # a resumed request keeps its expiry
            result = build_release(
                out,
                image,
                alg,
                make_request,
                None,
                lambda: pins or flow.keys(),
                now,
                signed_by=lambda: f"co-signed via {signing_url} ({flow.request_id})",
                sign_batch=flow.sign_batch,
                min_signers=lambda: flow.threshold,
                **deltas,
            )
    elif signing_url:
        token = os.environ.get(TOKEN_ENV, "")
        with SigningClient(signing_url, token, ca_file=signing_ca) as client:
            keys_box: list[PublicKey] = []

            if class_check is not None:
                for key in pins or [client.public_key()]:
                    class_check.before_remote(key)

            def sign_remote(req: SigningRequest) -> tuple[bytes, AuditHead]:
                r = client.sign(req)
                if class_check is not None:  # the service chose the exact algorithm
                    class_check.after_remote(r.envelope)
                return r.envelope, r.audit

            def remote_keys() -> list[PublicKey]:
                if pins:
                    return pins
                keys_box.append(client.public_key())
                return keys_box

            def mcuboot_remote(req: SigningRequest, data: bytes) -> tuple[bytes, AuditHead]:
                r = client.sign_mcuboot(req, data, geometry)
                return r.image, r.audit

            result = build_release(
                out,
                image,
                alg,
                make_request,
                sign_remote,
                remote_keys,
                now,
                signed_by=f"service {signing_url}",
                mcuboot=McubootJob(geometry, mcuboot_remote) if want_mcuboot else None,
                **deltas,
            )
    else:
        if audit_log is None:
            raise UsageError(
                ErrorCode.USAGE, "local signing needs --audit-log (every signature is audited)"
            )
        signers = load_signers(pkcs11_uris, pkcs11_module, key_files, alg_name)
        if class_check is not None:  # before the audit log or the state is opened
            class_check.before_local(signers)
        who = Requester(requester or f"local:{getpass.getuser()}", Role.SECURITY_OFFICER)
        pol = (
            Policy.from_json(read_limited(policy, MAX_POLICY))
            if policy is not None
            else Policy.allow_all(who.id)
        )
        sealer = _audit_sealer(audit_seal_pkcs11_uri, pkcs11_module, audit_seal_key_file)
        if sealer is not None:
            check_separate(sealer.public_key, [s.public_key for s in signers])
        st = SigningState(state or audit_log.with_name(audit_log.name + ".state.sqlite"))
        try:
            # A key of its own seals the log (never a release key: whoever can make that sign
            # could re-seal a rewritten history); without one the records stay unsealed.
            log = AuditLog.open(audit_log, sealer, seal_every=seal_every)
            service = SigningService(signers, pol, log, st)
            try:

                def sign_local(req: SigningRequest) -> tuple[bytes, AuditHead]:
                    signed = service.sign_release(req, who)
                    return signed.envelope, signed.audit

                def mcuboot_local(req: SigningRequest, data: bytes) -> tuple[bytes, AuditHead]:
                    signed = service.sign_mcuboot(req, who, data, geometry)
                    return signed.image, signed.audit

                result = build_release(
                    out,
                    image,
                    alg,
                    make_request,
                    sign_local,
                    lambda: [*(s.public_key for s in signers), *pins],
                    now,
                    signed_by=f"local {who.id}",
                    min_signers=len(signers),
                    mcuboot=McubootJob(geometry, mcuboot_local) if want_mcuboot else None,
                    **deltas,
                )
            finally:
                service.close()  # seals the audit log: a closed log ends with a seal
        finally:
            st.close()
            close_signers([*signers, *([sealer] if sealer is not None else [])])
    if result.summary.get("downgrade"):
        click.echo("WARNING: this release is an authorized version DOWNGRADE", err=True)
    if result.summary.get("fast_forward"):
        click.echo(
            "WARNING: this release is an authorized FAST-FORWARD (counter/version jump)", err=True
        )
    emit(result.summary, as_json, _summary_text)
    if not as_json:
        click.echo(f"  written   {result.out}")


class _ClassCheck:
    """The target class's algorithms (manifest/class_algs.py) held against the signer."""

    def __init__(self, table: ClassAlgs, cid: uuid.UUID) -> None:
        self.table, self.cid = table, cid

    def before_local(self, signers: Sequence[Signer]) -> None:
        for s in signers:
            self.table.require(self.cid, [s.alg], f"key {s.public_key.key_id.hex()}")

    def before_remote(self, key: PublicKey) -> None:
        self.table.require_kind(self.cid, key.kind, f"signing service key {key.key_id.hex()}")

    def after_remote(self, envelope: bytes) -> None:
        self.table.require(self.cid, envelope_algs(envelope), "the signing service")


def _class_check(path: Path | None, vendor: str, model: str, hw_rev: str) -> _ClassCheck | None:
    if path is None:
        return None
    from ..manifest.ids import class_id, vendor_id

    table = ClassAlgs.from_json(read_limited(path, MAX_TABLE))
    return _ClassCheck(table, class_id(vendor_id(vendor), model, hw_rev))
