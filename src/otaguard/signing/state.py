"""The signing service's memory: last release per class, the sequence counter, the audit anchor.

SQLite (stdlib ``sqlite3``, WAL, ``synchronous=FULL``): one ``BEGIN IMMEDIATE`` transaction
per signing request serializes concurrent signers (threads or processes sharing the file), and
a crash leaves either the whole update or none of it. The audit log stays the source of truth:
the state records the audit head it has seen (the out-of-band *anchor* that detects a log
truncated back to an earlier seal), and :func:`otaguard.signing.service.reconcile` replays any
signed records the state missed after a crash between the audit append and the commit.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator
from pathlib import Path

from ..errors import ErrorCode, OtaError
from ..fsutil import private_file
from .audit import AuditHead
from .policy import LastRelease

_SCHEMA = """
CREATE TABLE IF NOT EXISTS releases (
    class_id TEXT PRIMARY KEY,
    vendor TEXT NOT NULL,
    model TEXT NOT NULL,
    hw_rev TEXT NOT NULL,
    version TEXT NOT NULL,
    security_counter INTEGER NOT NULL,
    sequence INTEGER NOT NULL,
    updated INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
-- every full release signed, so a delta manifest can be signed later for exactly that release
CREATE TABLE IF NOT EXISTS signed_images (
    class_id TEXT NOT NULL,
    version TEXT NOT NULL,
    image_digest TEXT NOT NULL,
    sequence INTEGER NOT NULL,
    fields TEXT NOT NULL,
    PRIMARY KEY (class_id, version, image_digest)
);
-- co-signing requests (signing/cosign.py): one JSON document each, pending until k approvals
CREATE TABLE IF NOT EXISTS cosign_requests (id TEXT PRIMARY KEY, doc TEXT NOT NULL);
"""


class StateTxn:
    """Operations valid inside one :meth:`SigningState.transaction`."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def last_release(self, class_id: str) -> LastRelease | None:
        row = self._db.execute(
            "SELECT version, security_counter, sequence FROM releases WHERE class_id = ?",
            (class_id,),
        ).fetchone()
        return None if row is None else LastRelease(row[0], int(row[1]), int(row[2]))

    def last_sequence(self) -> int:
        v = self._get("sequence")
        return int(v) if v is not None else 0

    def next_sequence(self, now: int) -> int:
        """Assign the next manifest sequence number: above every earlier one, and at least
        ``now`` so a service restored from an old backup still issues numbers devices accept."""
        seq = max(self.last_sequence() + 1, now)
        self._set("sequence", str(seq))
        return seq

    def observe_sequence(self, seq: int) -> None:
        if seq > self.last_sequence():
            self._set("sequence", str(seq))

    def record_release(
        self,
        class_id: str,
        vendor: str,
        model: str,
        hw_rev: str,
        version: str,
        security_counter: int,
        sequence: int,
        now: int,
    ) -> None:
        self._db.execute(
            "INSERT INTO releases(class_id, vendor, model, hw_rev, version, security_counter,"
            " sequence, updated) VALUES (?,?,?,?,?,?,?,?) ON CONFLICT(class_id) DO UPDATE SET"
            " version=excluded.version, security_counter=excluded.security_counter,"
            " sequence=excluded.sequence, updated=excluded.updated",
            (class_id, vendor, model, hw_rev, version, security_counter, sequence, now),
        )

    def record_image(
        self, class_id: str, version: str, image_digest: str, sequence: int, fields: str
    ) -> None:
        """Remember a signed full release (``fields``: canonical JSON of its request)."""
        self._db.execute(
            "INSERT INTO signed_images(class_id, version, image_digest, sequence, fields)"
            " VALUES (?,?,?,?,?) ON CONFLICT(class_id, version, image_digest) DO UPDATE SET"
            " sequence=excluded.sequence, fields=excluded.fields"
            " WHERE excluded.sequence > signed_images.sequence",
            (class_id, version, image_digest, sequence, fields),
        )

    def signed_image(
        self, class_id: str, version: str, image_digest: str
    ) -> tuple[int, str] | None:
        """(sequence, fields) of the latest full release signed for this image, if any."""
        row = self._db.execute(
            "SELECT sequence, fields FROM signed_images"
            " WHERE class_id = ? AND version = ? AND image_digest = ?",
            (class_id, version, image_digest),
        ).fetchone()
        return None if row is None else (int(row[0]), str(row[1]))

    def cosign_get(self, request_id: str) -> str | None:
        row = self._db.execute(
            "SELECT doc FROM cosign_requests WHERE id = ?", (request_id,)
        ).fetchone()
        return None if row is None else str(row[0])

    def cosign_put(self, request_id: str, doc: str) -> None:
        self._db.execute(
            "INSERT INTO cosign_requests(id, doc) VALUES (?, ?)"
            " ON CONFLICT(id) DO UPDATE SET doc=excluded.doc",
            (request_id, doc),
        )

    def anchor(self) -> AuditHead | None:
        v = self._get("audit_head")
        return AuditHead.parse(v) if v else None

    def set_anchor(self, head: AuditHead) -> None:
        self._set("audit_head", str(head))

    def _get(self, k: str) -> str | None:
        row = self._db.execute("SELECT v FROM meta WHERE k = ?", (k,)).fetchone()
        return None if row is None else str(row[0])

    def _set(self, k: str, v: str) -> None:
        self._db.execute(
            "INSERT INTO meta(k, v) VALUES (?, ?) ON CONFLICT(k) DO UPDATE SET v=excluded.v",
            (k, v),
        )


class SigningState:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            private_file(self.path)  # the signing history: owner only
        except OSError as exc:
            raise OtaError(ErrorCode.DATABASE, f"signing state {self.path}: {exc}") from None
        try:
            self._db = sqlite3.connect(
                self.path, timeout=30, isolation_level=None, check_same_thread=False
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise OtaError(ErrorCode.DATABASE, f"signing state {self.path}: {exc}") from None
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[StateTxn]:
        """BEGIN IMMEDIATE ... COMMIT; any exception rolls the whole request back."""
        with self._lock:
            try:
                self._db.execute("BEGIN IMMEDIATE")
            except sqlite3.Error as exc:
                raise OtaError(ErrorCode.DATABASE, f"signing state busy: {exc}") from None
            try:
                yield StateTxn(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            try:
                self._db.execute("COMMIT")
            except sqlite3.Error as exc:
                self._db.execute("ROLLBACK")
                raise OtaError(ErrorCode.DATABASE, f"signing state commit failed: {exc}") from None

    def snapshot(self) -> tuple[AuditHead | None, int]:
        with self.transaction() as tx:
            return tx.anchor(), tx.last_sequence()

    def close(self) -> None:
        self._db.close()
