"""Setting up a simulated world: keys, firmware, releases, the real server, the fleet.

Everything is real: Ed25519 keys (SoftHSM2 token when available), SUIT envelopes, a bsdiff
delta, the fleet CA issuing one P-256 client certificate per device, the update server
(uvicorn, mTLS, SQLite) on loopback, and one device runtime (flash file, bootloader, agent)
per simulated device. Shortcuts taken for speed are listed in docs/simulator.md.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import secrets
import shutil
import stat
import subprocess
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ..adminclient import AdminClient, Campaign, CampaignAction
from ..clock import Clock
from ..crypto.algorithms import HashAlg
from ..crypto.cose import Signer
from ..crypto.software import SoftwareSigner, generate_private_key
from ..delta import create_patch
from ..device.device import Device, Provisioning
from ..device.faults import FaultInjector
from ..device.layout import LayoutConfig
from ..device.storage import Identity
from ..errors import ErrorCode, OtaError, UsageError
from ..manifest.build import build_envelope
from ..manifest.ids import class_id, vendor_id
from ..manifest.model import DeltaInfo, ManifestInfo
from ..server.pki.ca import FleetCA, spki_sha256
from ..server.pki.enroll import issue_server_cert
from ..server.storage import store
from ..server.storage.db import Database, sqlite_url
from ..trust.bundle import TrustBundle
from ..trust.documents import issue_authorization, sign_keylist
from ..trust.model import Role, Scope
from .serverproc import ServerProcess, ServerSpec
from .sharedclock import SharedClock

VENDOR = "hvac.example.com"
MODEL, HW_REV = "ctl-9", "rev-b"
OTHER_MODEL = "ctl-7"  # another product line: its firmware is the cross-model attack
V_OLD, V_NEW = "1.0.0", "1.1.0"
DAY = 86400


# --- keys ----------------------------------------------------------------------------------------
@dataclass
class KeySet:
    root: Signer
    op: Signer  # signs the factory image (and the patch when there is no rotation)
    op_new: Signer | None  # the rotated-in key (signs the patch when rotating)
    backend: str
    cleanup: Callable[[], None] = lambda: None


def _softhsm_keys(work: Path, rotation: bool) -> KeySet | None:
    """Root and operational keys generated inside a fresh SoftHSM2 token (None if absent)."""
    util = shutil.which("softhsm2-util")
    try:
        from ..crypto import pkcs11 as p11
    except ImportError:
        return None
    module = next(
        (
            m
            for m in (
                os.environ.get("OTAGUARD_PKCS11_MODULE", ""),
                "/usr/lib/softhsm/libsofthsm2.so",
                "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
            )
            if m and Path(m).exists()
        ),
        None,
    )
    if util is None or module is None:
        return None
    tok = work / "softhsm"
    (tok / "tokens").mkdir(parents=True, exist_ok=True)
    conf = tok / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tok / 'tokens'}\nobjectstore.backend = file\n")
    pin = secrets.token_hex(8)
    env = dict(os.environ, SOFTHSM2_CONF=str(conf))
    subprocess.run(
        [util, "--init-token", "--free", "--label", "otaguard-sim", "--pin", pin, "--so-pin", pin],
        env=env,
        check=True,
        capture_output=True,
    )
    os.environ["SOFTHSM2_CONF"] = str(conf)
    signers: list[Signer] = []
    for label in ("root", "op-1", "op-2"):
        p11.generate_keypair("otaguard-sim", label, "ed25519", pin=pin, module=module)
        uri = f"pkcs11:token=otaguard-sim;object={label};type=private"
        signers.append(p11.Pkcs11Signer.open(uri, pin=pin, module=module))
    return KeySet(signers[0], signers[1], signers[2] if rotation else None, "softhsm2")


def make_keys(work: Path, rotation: bool, mode: str) -> KeySet:
    if mode in ("auto", "softhsm"):
        try:
            ks = _softhsm_keys(work, rotation)
        except (OtaError, OSError, subprocess.CalledProcessError, TypeError, ValueError) as exc:
            if mode == "softhsm":
                raise UsageError(ErrorCode.USAGE, f"SoftHSM2 keys failed: {exc}") from None
            ks = None
        if ks is not None:
            return ks
        if mode == "softhsm":
            raise UsageError(ErrorCode.USAGE, "SoftHSM2 (softhsm2-util + module) not found")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        root = SoftwareSigner(generate_private_key("ed25519"))
        op = SoftwareSigner(generate_private_key("ed25519"))
        op2 = SoftwareSigner(generate_private_key("ed25519")) if rotation else None
    return KeySet(root, op, op2, "software (in memory, development only)")


# --- firmware ------------------------------------------------------------------------------------
def firmware_pair(size: int, seed: int) -> tuple[bytes, bytes]:
    """Two synthetic firmware versions: a code-like image and a small patch of it.

    The image is built from a repeating-ish instruction-like stream (so it compresses like
    code, not like noise); the new version changes a few functions (byte edits in three
    places) and inserts ~300 bytes of new code, shifting everything after it, as a security
    fix does.
    """
    rng = random.Random(seed)
    words = [rng.randbytes(4) for _ in range(512)]
    out = bytearray()
    while len(out) < size:
        out += words[int(rng.paretovariate(1.2)) % len(words)]
        if rng.random() < 0.05:
            out += rng.randbytes(4)
    old = bytes(out[:size])
    new = bytearray(old)
    for _ in range(3):
        at = rng.randrange(size - 64)
        for j in range(0, 48, 3):
            new[at + j] ^= 0x5A
    ins = rng.randrange(size // 4, size // 2)
    new[ins:ins] = rng.randbytes(300)
    return old, bytes(new[: size + 300])


def layout_for(image_size: int) -> LayoutConfig:
    sector = 4096
    slot = ((image_size + 300 + 8192 + 2 * sector - 1) // sector) * sector
    return LayoutConfig(sector_size=sector, page_size=1024, slot_size=slot)


@dataclass
class Releases:
    vendor_id: uuid.UUID
    class_id: uuid.UUID
    bundle: TrustBundle
    keylist_v2: bytes | None
    v_old: bytes
    v_new: bytes
    patch: bytes
    factory_manifest: bytes
    new_manifest: bytes
    delta_manifest: bytes
    other_manifest: bytes  # another model's firmware (cross-model attack)
    other_image: bytes
    keylist_target: int

    def provisioning(self) -> Provisioning:
        """What the factory puts on every simulated device: trust bundle, ids, v_old's manifest."""
        return Provisioning(
            bundle=self.bundle,
            vendor_id=self.vendor_id,
            class_id=self.class_id,
            model=MODEL,
            hw_rev=HW_REV,
            factory_manifest=self.factory_manifest,
        )


def make_releases(keys: KeySet, image_size: int, seed: int, now: int) -> Releases:
    vid = vendor_id(VENDOR)
    cid = class_id(vid, MODEL, HW_REV)
    other_cid = class_id(vid, OTHER_MODEL, HW_REV)

    def auth(key: Signer) -> bytes:
        return issue_authorization(
            keys.root,
            key.public_key,
            roles=frozenset({Role.FIRMWARE, Role.KEYLIST}),
            scopes=[Scope(vid, frozenset({cid, other_cid}))],
            not_before=now - 30 * DAY,
            not_after=now + 365 * DAY,
            name="sim",
        )

    auths = [auth(keys.op)]
    kl1 = sign_keylist(keys.root, version=1, authorizations=auths, issued_at=now - DAY)
    bundle = TrustBundle(keys.root.public_key, kl1)
    kl2 = None
    if keys.op_new is not None:
        kl2 = sign_keylist(
            keys.root,
            version=2,
            authorizations=[*auths, auth(keys.op_new)],
            issued_at=now - 60,
        )
    old, new = firmware_pair(image_size, seed)
    patch = create_patch(old, new)

    def info(img: bytes, version: str, seq: int, counter: int, cls: uuid.UUID) -> ManifestInfo:
        return ManifestInfo(
            sequence_number=seq,
            vendor_id=vid,
            class_id=cls,
            digest_alg=HashAlg.SHA256,
            image_digest=hashlib.sha256(img).digest(),
            image_size=len(img),
            version=version,
            min_version=None,
            security_counter=counter,
            expires=now + 90 * DAY,
            uri=None,
            text={"model": MODEL if cls == cid else OTHER_MODEL, "hw_rev": HW_REV},
        )

    signer = keys.op_new or keys.op
    factory = build_envelope(info(old, V_OLD, 1, 1, cid), [keys.op])
    full_info = info(new, V_NEW, 2, 2, cid)
    full = build_envelope(full_info, [signer])
    d = DeltaInfo(
        base_digest=hashlib.sha256(old).digest(),
        patch_digest=hashlib.sha256(patch).digest(),
        patch_size=len(patch),
        patch_uri=None,
    )
    from dataclasses import replace as dc_replace

    delta = build_envelope(dc_replace(full_info, delta=d), [signer])
    other_img = firmware_pair(image_size, seed + 99)[1]
    other = build_envelope(info(other_img, "9.0.0", 50, 5, other_cid), [keys.op])
    return Releases(
        vid,
        cid,
        bundle,
        kl2,
        old,
        new,
        patch,
        factory,
        full,
        delta,
        other,
        other_img,
        2 if kl2 is not None else 1,
    )


# --- server --------------------------------------------------------------------------------------
@dataclass
class ServerWorld:
    proc: ServerProcess
    admin: AdminClient  # as the security officer; ``as_token`` for the other roles
    ca: FleetCA
    db: Database
    ca_pem: Path
    tokens: dict[str, str]
    prev_clock: Clock
    spki_pin: str = ""  # SHA-256 of the server certificate's public key, hex

    @property
    def url(self) -> str:
        return self.proc.device_url

    def close(self) -> None:
        self.admin.close()
        self.proc.stop()
        self.db.dispose()
        store.set_clock(self.prev_clock)


def start_server(work: Path, clock: SharedClock, rel: Releases, procs: int = 1) -> ServerWorld:
    """The real update server (device API on mTLS, admin API on TLS) in ``procs`` processes
    of its own (serverproc), reading ``clock``; the database is prepared (schema, admin
    tokens) here first."""
    ca = FleetCA.create(work / "ca", passphrase=secrets.token_hex(16).encode())
    tls = work / "tls"
    issued = issue_server_cert(ca, tls, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    ca_pem = tls / "ca.pem"
    ca_pem.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    # NORMAL: WAL commits without an fsync each; the simulator does not test durability.
    url = sqlite_url(work / "otaguard.db")
    db = Database(url, sqlite_synchronous="NORMAL")
    db.upgrade()
    tokens: dict[str, str] = {}
    # token and enrollment timestamps (written here) on simulated time too
    prev = store.set_clock(clock)
    for name, role in (
        ("simulator", "security-officer"),
        ("sim-release-manager", "release-manager"),
        ("sim-operator", "operator"),
    ):
        with db.write() as conn:
            tokens[role] = store.create_token(conn, name, role)
    spec = ServerSpec(url, work / "blobs", tls, clock.name, rel.bundle.to_bytes(), procs)
    proc = ServerProcess(spec).start()
    admin = AdminClient.connect(
        proc.admin_url, token=tokens["security-officer"], ca_file=ca_pem, timeout=60
    )
    return ServerWorld(proc, admin, ca, db, ca_pem, tokens, prev, spki_sha256(issued.cert))


# --- campaigns, through the admin API (as an operator would) ------------------------------------
def create_campaign(w: ServerWorld, body: dict[str, Any]) -> Campaign:
    return w.admin.create_campaign(body)


def campaign_action(
    w: ServerWorld, name: str, action: CampaignAction, reason: str | None = None
) -> Campaign:
    return w.admin.campaign_action(name, action, reason)


def list_campaigns(w: ServerWorld) -> list[dict[str, Any]]:
    return cast(list[dict[str, Any]], w.admin.list_campaigns())


def publish(w: ServerWorld, rel: Releases) -> int:
    """Key list (when rotating), the new release and its delta — through the admin API."""
    if rel.keylist_v2 is not None:
        w.admin.put_keylist(rel.keylist_v2)
    rm = w.admin.as_token(w.tokens["release-manager"])
    img = rm.upload_blob(rel.v_new)
    rid = rm.create_release(rel.new_manifest, img["blob"])["id"]
    patch = rm.upload_blob(rel.patch)
    rm.create_delta(rid, rel.delta_manifest, patch["blob"], base_version=V_OLD)
    return rid


# --- devices -------------------------------------------------------------------------------------
@dataclass
class DeviceFiles:
    serial: str
    dir: Path
    cert: Path
    key: Path


def _sparse_blocks(path: Path, block: int = 4096) -> tuple[int, list[tuple[int, bytes]]]:
    data = path.read_bytes()
    zero = bytes(block)
    blocks = [
        (off, data[off : off + block])
        for off in range(0, len(data), block)
        if data[off : off + block] != zero
    ]
    return len(data), blocks


@dataclass
class Fleet:
    files: list[DeviceFiles]
    golden: Path
    cfg: LayoutConfig
    extra: dict[str, DeviceFiles] = field(default_factory=dict)


def enroll_fleet(
    w: ServerWorld,
    rel: Releases,
    root: Path,
    n: int,
    clock: Clock,
    progress: Callable[[int], None] = lambda i: None,
    ready: Callable[[list[DeviceFiles]], None] = lambda files: None,
    batch_size: int = 250,
) -> Fleet:
    """Manufacture ``n`` devices: one golden device, copied; each its own enrolled identity.
    ``ready`` gets each batch of devices as soon as the server knows them (registered), so
    the caller can start them while the next batch is manufactured."""
    cfg = layout_for(len(rel.v_new))
    golden = root / "golden"
    prov = rel.provisioning()
    from ..device.lab import chunks

    with Device.create(golden, cfg, prov, chunks(rel.v_old), clock=lambda: int(clock.now())):
        pass
    size, blocks = _sparse_blocks(golden / "flash.bin")
    dev_json = (golden / "device.json").read_bytes()
    files: list[DeviceFiles] = []
    batch: list[tuple[str, str, int]] = []
    for i in range(n):
        serial = f"HVAC-{i:06d}"
        files.append(
            _make_device(w, root / "devices" / f"{i:06d}", serial, size, blocks, dev_json, batch)
        )
        if len(batch) >= batch_size or i == n - 1:
            _register(w, batch)
            ready(files[len(files) - len(batch) :])
            batch.clear()
        progress(i + 1)
    fleet = Fleet(files, golden, cfg)
    # one extra enrolled device whose certificate is then revoked (revoked-cert attack)
    rev = _make_device(
        w, root / "devices" / "revoked", "ATK-REVOKED", size, blocks, dev_json, batch
    )
    _register(w, batch)
    with w.db.write() as conn:
        store.revoke_device(conn, "ATK-REVOKED")
    fleet.extra["revoked"] = rev
    return fleet


def _make_device(
    w: ServerWorld,
    d: Path,
    serial: str,
    size: int,
    blocks: list[tuple[int, bytes]],
    dev_json: bytes,
    batch: list[tuple[str, str, int]],
) -> DeviceFiles:
    d.mkdir(parents=True, exist_ok=True)
    with (d / "flash.bin").open("wb") as f:
        f.truncate(size)
        for off, b in blocks:
            f.seek(off)
            f.write(b)
    (d / "device.json").write_bytes(dev_json)
    key = ec.generate_private_key(ec.SECP256R1())
    issued = w.ca.issue_device(serial, key.public_key(), days=90)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (d / "device.key").write_bytes(key_pem)
    os.chmod(d / "device.key", 0o600)
    (d / "device.pem").write_bytes(issued.pem)
    batch.append((serial, issued.fingerprint, int(issued.cert.not_valid_after_utc.timestamp())))
    return DeviceFiles(serial, d, d / "device.pem", d / "device.key")


def _register(w: ServerWorld, batch: list[tuple[str, str, int]]) -> None:
    with w.db.write() as conn:
        for serial, fp, not_after in batch:
            store.register_device(
                conn,
                serial=serial,
                model=MODEL,
                hw_rev=HW_REV,
                groups=["sim"],
                cert_fingerprint=fp,
                cert_not_after=not_after,
            )


def open_device(f: DeviceFiles, clock: Clock, faults: FaultInjector | None = None) -> Device:
    dev = Device(f.dir, faults=faults or FaultInjector(), clock=lambda: int(clock.now()))
    if dev.storage.identity() is None:
        dev.storage.write_identity(Identity(f.key.read_bytes(), f.cert.read_bytes()))
    return dev


SHM = Path("/dev/shm")  # noqa: S108 - only ever used through mkdtemp (private, 0700)
FLASH_PREFIX = "otaguard-sim-flash-"
OWNER_FILE = ".owner"  # flock-held by the run using the directory, for its whole life
_held: dict[Path, int] = {}  # flash directory -> descriptor holding its owner lock


def flash_dir(work: Path, devices: int, shm: Path = SHM) -> Path:
    """Where the devices' flash files live: in RAM (tmpfs) when there is room for them.

    A device polls every few simulated hours, i.e. tens of wall seconds; on a disk-backed
    file system the kernel evicts those idle pages and every poll then reads its flash back
    from disk (gigabytes over a 14,000-device run). tmpfs pages are never evicted without
    swap. Same files, same semantics; elsewhere the work directory is used.

    tmpfs is memory until the files are removed, and a killed run (SIGKILL, out of memory)
    removes nothing: first the directories of runs that are gone are swept (see
    :func:`sweep_stale_flash`)."""
    try:
        if not os.access(shm, os.W_OK):
            raise OSError(f"{shm} is not writable")
        sweep_stale_flash(shm)  # before measuring the room: what it frees counts
        st = os.statvfs(shm)
        if st.f_bavail * st.f_frsize >= devices * 1024 * 1024 + (1 << 30):
            d = Path(tempfile.mkdtemp(prefix=FLASH_PREFIX, dir=shm))
            fd = os.open(d / OWNER_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            fcntl.flock(fd, fcntl.LOCK_EX)
            _held[d] = fd
            return d
    except OSError:
        pass
    d = work / "flash"
    d.mkdir(exist_ok=True)
    return d


def remove_flash_dir(d: Path) -> None:
    """Remove a flash directory (and give up its owner lock)."""
    shutil.rmtree(d, ignore_errors=True)
    fd = _held.pop(d, None)
    if fd is not None:
        os.close(fd)


def sweep_stale_flash(shm: Path = SHM, *, unowned_after_s: float = 3600.0) -> list[Path]:
    """Remove the flash directories of runs that no longer exist; the ones removed.

    A live run holds an ``flock`` on the directory's owner file for as long as it uses the
    directory; the kernel releases it when the process ends, however it ends. So a lock this
    process can take means nobody is using the directory. A directory without an owner file
    (made by an older version, or one being created this instant) is removed only when it has
    not been modified for ``unowned_after_s``. Only this user's directories are touched."""
    removed: list[Path] = []
    try:
        entries = list(shm.iterdir())
    except OSError:
        return removed
    uid = os.getuid()
    for d in entries:
        try:
            if not d.name.startswith(FLASH_PREFIX) or d in _held:
                continue
            st = d.lstat()
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != uid:
                continue
            try:
                fd = os.open(d / OWNER_FILE, os.O_RDWR | os.O_CLOEXEC)
            except FileNotFoundError:
                if time.time() - st.st_mtime < unowned_after_s:
                    continue
            else:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # its run is alive
                finally:
                    os.close(fd)
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
        except OSError:
            continue
    return removed


def scratch_dir(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix="sim-", dir=out))
