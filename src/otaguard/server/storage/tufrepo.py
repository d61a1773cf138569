"""The server's TUF repository: stores root/targets as uploaded, signs snapshot and timestamp.

The snapshot and timestamp keys are the server's own *online* keys, of limited power: root
names them for those two roles only, so with them one can say which targets version is current
and that the repository is fresh, never add or change a target (that needs the targets key, in
the release HSM). Whoever holds them can keep a chosen published state looking fresh (a freeze
within what the targets key signed, until the targets expire); a server that merely stops is
seen by every client within one timestamp lifetime (docs/threat-model.md 2.11).

Files under ``<data>/tuf/``: ``keys/{snapshot,timestamp}.pem`` (generated at first start,
owner-only; not used when the two keys are given as PKCS#11 signers),
``metadata/N.root.json`` (every version: clients walk the chain),
``metadata/N.targets.json``, ``metadata/N.snapshot.json`` (consistent snapshots) and
``metadata/timestamp.json``. Every file is written atomically, timestamp last, so a client
never sees a timestamp naming a snapshot that is not there yet. The timestamp is re-signed
lazily when a client asks and less than half of its lifetime is left.

The processes of one node (``server run --workers``) share the directory: one writes at a
time (``lock``, threads then processes, as SQLite's writers), and each re-reads the files
when ``generation`` (a counter every write moves, under the lock) says another has changed
them, so no process re-signs from, or serves, a state another has replaced.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from securesystemslib.signer import CryptoSigner
from securesystemslib.signer import Signer as SslibSigner
from tuf.api.metadata import Metadata, Root, Snapshot, Targets, Timestamp

from ...crypto.cose import Signer
from ...crypto.keys import PublicKey
from ...errors import ErrorCode, OtaError, ServerError
from ...fsutil import atomic_write, private_file, read_limited
from ...tufrepo import metadata as tm
from ...tufrepo.signer import TufSigner, tuf_key
from . import store
from .db import WriterLock

DAY = 86400
ONLINE_ROLES = ("snapshot", "timestamp")
_VERSIONED = re.compile(r"\A([1-9][0-9]{0,9})\.(root|targets|snapshot)\.json\Z")


@dataclass(frozen=True)
class TufSettings:
    timestamp_ttl: int = DAY  # timestamp expiry: how long a freeze can go unnoticed
    snapshot_ttl: int = 7 * DAY
    max_targets_validity: int = 366 * DAY  # uploaded targets expiring later: E_POLICY


def _load_or_create_key(path: Path) -> ed25519.Ed25519PrivateKey:
    if not path.exists():
        key = ed25519.Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        private_file(path)
        atomic_write(path, pem, mode=0o600)
        return key
    obj = serialization.load_pem_private_key(read_limited(path, 16 * 1024), None)
    if not isinstance(obj, ed25519.Ed25519PrivateKey):
        raise OtaError(ErrorCode.KEY_FORMAT, f"{path}: not an Ed25519 key")
    return obj


class TufRepository:
    def __init__(
        self,
        root: Path,
        settings: TufSettings | None = None,
        *,
        clock: Callable[[], int] = store.now_s,
        online: Mapping[str, Signer] | None = None,
    ) -> None:
        """``online``: the snapshot and timestamp signers (e.g. PKCS#11 keys); without them
        the keys are files in ``keys/``, generated at first start."""
        self.dir = Path(root)
        self.meta = self.dir / "metadata"
        self.meta.mkdir(parents=True, exist_ok=True)
        self.settings = settings or TufSettings()
        self._clock = clock
        # Threads of this process, then the processes sharing this directory.
        self._lock = WriterLock(self.dir / "lock")
        self._generation = -1  # of the files last read
        self._public: dict[str, PublicKey] = {}
        self._signers: dict[str, SslibSigner] = {}
        if online is not None:
            if set(online) != set(ONLINE_ROLES):
                raise OtaError(ErrorCode.USAGE, "give both the snapshot and the timestamp key")
            if online["snapshot"].public_key == online["timestamp"].public_key:
                raise OtaError(ErrorCode.USAGE, "the snapshot and timestamp keys must differ")
            for role, signer in online.items():
                self._public[role] = signer.public_key
                self._signers[role] = TufSigner(signer)
        else:
            (self.dir / "keys").mkdir(mode=0o700, exist_ok=True)
            for role in ONLINE_ROLES:
                k = _load_or_create_key(self.dir / "keys" / f"{role}.pem")
                self._public[role] = PublicKey(k.public_key())
                self._signers[role] = CryptoSigner(k, tuf_key(self._public[role]))
        self.root: Metadata[Root] | None = None
        self.targets: Metadata[Targets] | None = None
        self.snapshot: Metadata[Snapshot] | None = None
        self.timestamp: Metadata[Timestamp] | None = None
        self._timestamp_bytes = b""
        self._stale = False
        with self._lock:
            self._sync()

    def _disk_generation(self) -> int:
        try:
            return int((self.dir / "generation").read_text() or 0)
        except FileNotFoundError:
            return 0

    def _sync(self) -> None:
        """Re-read the files if another process has changed them (call under the lock)."""
        gen = self._disk_generation()
        if gen != self._generation:
            self._load()
            self._generation = gen

    def _wrote(self) -> None:
        """After a write (under the lock): tell the other processes to re-read."""
        self._generation = self._disk_generation() + 1
        atomic_write(self.dir / "generation", str(self._generation).encode())

    # --- state -------------------------------------------------------------------------------
    def _versions(self, role: str) -> list[int]:
        out = []
        for p in self.meta.iterdir():
            m = _VERSIONED.match(p.name)
            if m and m.group(2) == role:
                out.append(int(m.group(1)))
        return sorted(out)

    def _read(self, name: str) -> bytes:
        return read_limited(self.meta / name, tm.MAX_METADATA)

    def _load(self) -> None:
        roots = self._versions("root")
        if roots:
            self.root = Metadata[Root].from_bytes(self._read(f"{roots[-1]}.root.json"))
        for role, cls in (("targets", Targets), ("snapshot", Snapshot)):
            vs = self._versions(role)
            if vs:
                md = Metadata.from_bytes(self._read(f"{vs[-1]}.{role}.json"))
                assert isinstance(md.signed, cls)
                setattr(self, role, md)
        if (self.meta / "timestamp.json").exists():
            self._timestamp_bytes = self._read("timestamp.json")
            self.timestamp = Metadata[Timestamp].from_bytes(self._timestamp_bytes)
        # Signed by keys this server no longer has (it now uses HSM keys, say) while the root
        # already names the new ones: re-sign both on the first request.
        self._stale = self._root_names_us() and any(
            md is not None and self._signers[role].public_key.keyid not in md.signatures
            for role, md in (("snapshot", self.snapshot), ("timestamp", self.timestamp))
        )

    def _root_names_us(self) -> bool:
        """Whether the current root names this server's online keys (only then is a new
        snapshot or timestamp of any use to a client)."""
        return self.root is not None and all(
            set(self.root.signed.roles[role].keyids) == {signer.public_key.keyid}
            for role, signer in self._signers.items()
        )

    def online_keys(self) -> dict[str, PublicKey]:
        """The snapshot and timestamp public keys, for the root ceremony to name."""
        return dict(self._public)

    # --- publication -------------------------------------------------------------------------
    def put_root(self, data: bytes) -> int:
        """Store the first root, or the next version (signed by old and new root keys)."""
        now = self._clock()
        with self._lock:
            self._sync()
            if self.root is None:
                new = tm.check_first_root(data, now)
            else:
                new = tm.check_root_update(self.root, data, now)
            self._check_online_roles(new)
            atomic_write(self.meta / f"{new.signed.version}.root.json", data)
            self.root = new
            if self.targets is not None:
                # re-signed at once: after a rotation a client checks them with this root
                self._new_snapshot(now)
            self._wrote()
            return new.signed.version

    def _check_online_roles(self, root: Metadata[Root]) -> None:
        for role, signer in self._signers.items():
            if set(root.signed.roles[role].keyids) != {signer.public_key.keyid}:
                raise ServerError(
                    ErrorCode.UNTRUSTED_KEY,
                    f"root must name exactly this server's {role} key "
                    "(GET /admin/v1/tuf/online-keys)",
                    409,
                )
            if root.signed.roles[role].threshold != 1:
                raise ServerError(ErrorCode.UNSUPPORTED, f"{role} threshold must be 1", 409)

    def put_targets(self, data: bytes, has_blob: Callable[[str], bool]) -> int:
        """Verify uploaded targets against the current root, check every image is in the blob
        store (uploaded first, as for SUIT releases), then sign snapshot + timestamp."""
        now = self._clock()
        with self._lock:
            self._sync()
            if self.root is None:
                raise ServerError(ErrorCode.UNTRUSTED_KEY, "no TUF root uploaded yet", 409)
            current = self.targets.signed.version if self.targets else 0
            md = tm.check_targets(self.root, data, now, self.settings.max_targets_validity, current)
            for path, info in md.signed.targets.items():
                if not has_blob(info.hashes.get("sha256", "")):
                    raise ServerError(
                        ErrorCode.NOT_FOUND,
                        f"target {path}: image not uploaded (POST /admin/v1/images first)",
                        409,
                    )
            version = md.signed.version
            atomic_write(self.meta / f"{version}.targets.json", data)
            self.targets = md
            self._new_snapshot(now)
            self._wrote()
            return version

    def _new_snapshot(self, now: int) -> None:
        assert self.targets is not None
        version = self.snapshot.signed.version + 1 if self.snapshot else 1
        snap = tm.build_snapshot(
            version, now + self.settings.snapshot_ttl, self.targets.signed.version
        )
        data = tm.sign(snap, [self._signers["snapshot"]])
        atomic_write(self.meta / f"{version}.snapshot.json", data)
        self.snapshot = snap
        self._new_timestamp(now)

    def _new_timestamp(self, now: int) -> None:
        assert self.snapshot is not None
        version = self.timestamp.signed.version + 1 if self.timestamp else 1
        ts = tm.build_timestamp(
            version, now + self.settings.timestamp_ttl, self.snapshot.signed.version
        )
        data = tm.sign(ts, [self._signers["timestamp"]])
        atomic_write(self.meta / "timestamp.json", data)
        self.timestamp, self._timestamp_bytes = ts, data

    # --- serving -----------------------------------------------------------------------------
    def timestamp_bytes(self) -> bytes:
        """The current timestamp, re-signed first when less than half its lifetime is left
        (and the snapshot too when it would expire before the new timestamp)."""
        now = self._clock()
        with self._lock:
            self._sync()
            if self.timestamp is None or self.snapshot is None:
                raise ServerError(ErrorCode.NOT_FOUND, "no TUF targets published yet", 404)
            left = tm.posix(self.timestamp.signed.expires) - now
            if self._stale:
                self._new_snapshot(now)
                self._stale = False
                self._wrote()
            elif left < self.settings.timestamp_ttl // 2 and self._root_names_us():
                if tm.posix(self.snapshot.signed.expires) - now < self.settings.timestamp_ttl:
                    self._new_snapshot(now)
                else:
                    self._new_timestamp(now)
                self._wrote()
            return self._timestamp_bytes

    def metadata_bytes(self, name: str) -> bytes:
        """``N.root.json``, ``N.targets.json`` or ``N.snapshot.json``; E_NOT_FOUND otherwise."""
        if not _VERSIONED.match(name) or not (self.meta / name).is_file():
            raise ServerError(ErrorCode.NOT_FOUND, f"no TUF metadata {name}", 404)
        return self._read(name)

    def target_blob(self, path: str) -> str:
        """The blob (sha256) for ``dir/<sha256>.<name>`` if the current targets list it."""
        head, _, base = path.rpartition("/")
        digest, dot, name = base.partition(".")
        with self._lock:
            self._sync()
            targets = self.targets
        wanted = f"{head}/{name}" if head else name
        info = targets.signed.targets.get(wanted) if targets is not None and dot else None
        if info is None or info.hashes.get("sha256") != digest:
            raise ServerError(ErrorCode.NOT_FOUND, f"no TUF target {path}", 404)
        return digest
