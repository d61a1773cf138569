"""Tamper-evident audit log: hash-chained JSON lines, periodically sealed with a signature.

Format (one record per line, UTF-8, ``\\n``-terminated, canonical JSON: sorted keys, no
whitespace, ASCII only)::

    {"actor":"ci","op":"sign-manifest","prev":"<sha256 hex of previous line>","seq":7,
     "subject":{...},"time":1767225600,"v":1}

* ``seq`` is the record's 0-based position in the file; record 0 is the ``log-open`` genesis
  record (``prev`` = 64 zeros, subject holds a random ``log_id``).
* ``prev`` is SHA-256 over the previous line's bytes exactly as stored (without its newline).
* A ``seal`` record carries ``sig``: a tagged COSE_Sign1 (hex) with a detached payload, which
  is the canonical JSON of the seal record itself without ``sig``. It therefore signs the chain
  head (its ``prev``), its own position and time. Seals are written every ``seal_every``
  records and on :meth:`AuditLog.close`.

Why lines must be canonical: the hash covers raw bytes, so two spellings of the same JSON
would be two different chains. The verifier re-serializes every record and refuses anything
that is not byte-identical, so a single changed byte can never be "harmless".

What :func:`verify_log` detects is documented in ``docs/signing.md`` (§ Audit log); in short:
edits, deletions, insertions and reordering anywhere (E_AUDIT_CHAIN, naming the first bad
record), forged or broken seals (E_AUDIT_SEAL), a torn last line (E_AUDIT_CHAIN), unsealed tail
records (E_AUDIT_SEAL unless explicitly allowed), and truncation back to an earlier seal only
when the caller supplies an out-of-band anchor (``expect_head``), which the signing service
keeps in its state database.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..crypto.cose import Signer, decode_sign1, sign1
from ..crypto.keys import PublicKey
from ..errors import AuditError, ErrorCode, OtaError

FORMAT_VERSION = 1
MAX_RECORD = 64 * 1024  # bytes per line; a longer line is refused
ZERO_HASH = "0" * 64
OP_OPEN = "log-open"
OP_SEAL = "seal"
OP_RECOVER = "recover-torn-tail"
SEAL_ACTOR = "audit-sealer"
DEFAULT_SEAL_EVERY = 16

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_HEX = re.compile(r"^(?:[0-9a-f]{2})+$")
_FIELDS = {"v", "seq", "time", "actor", "op", "subject", "prev"}


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def record_hash(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    time: int
    actor: str
    op: str
    subject: dict[str, Any]
    prev: str
    hash: str  # SHA-256 of this record's line
    sig: bytes | None = None  # seals only

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "seq": self.seq,
            "time": self.time,
            "actor": self.actor,
            "op": self.op,
            "subject": self.subject,
            "prev": self.prev,
            "hash": self.hash,
        }
        if self.sig is not None:
            d["sig"] = self.sig.hex()
        return d


@dataclass(frozen=True)
class AuditHead:
    """The last record of a log: an anchor the service stores out of band."""

    seq: int
    hash: str

    def __str__(self) -> str:
        return f"{self.seq}:{self.hash}"

    @classmethod
    def parse(cls, text: str) -> AuditHead:
        seq_s, sep, h = text.partition(":")
        if not sep or not seq_s.isdigit() or not _HEX64.match(h):
            raise AuditError(ErrorCode.USAGE, f"anchor must be SEQ:SHA256HEX, got {text!r}")
        return cls(int(seq_s), h)


@dataclass
class AuditReport:
    records: int = 0
    seals: int = 0
    log_id: str | None = None
    head: AuditHead | None = None
    last_seal: int | None = None  # index of the last seal record
    first_unsealed: int | None = None  # index of the first record no seal covers
    seal_key_ids: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    continues: dict[str, str] | None = None  # previous file's log_id and final head (rotation)

    @property
    def unsealed(self) -> int:
        return 0 if self.first_unsealed is None else self.records - self.first_unsealed

    def to_dict(self) -> dict[str, Any]:
        return {
            "records": self.records,
            "seals": self.seals,
            "log_id": self.log_id,
            "head": str(self.head) if self.head else None,
            "last_seal": self.last_seal,
            "first_unsealed": self.first_unsealed,
            "unsealed": self.unsealed,
            "seal_key_ids": self.seal_key_ids,
            "warnings": self.warnings,
            "continues": self.continues,
        }


# --- parsing ------------------------------------------------------------------------------------


def _bad(index: int, detail: str, code: ErrorCode = ErrorCode.AUDIT_CHAIN) -> AuditError:
    return AuditError(code, f"record {index}: {detail}", record=index)


def parse_record(line: bytes, index: int) -> AuditRecord:
    """Parse one stored line (without newline); refuse anything not in canonical form."""
    if len(line) > MAX_RECORD:
        raise _bad(index, f"longer than {MAX_RECORD} bytes")
    try:
        obj = json.loads(line.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise _bad(index, "not a JSON record (edited or torn)") from None
    if not isinstance(obj, dict):
        raise _bad(index, "not a JSON object")
    keys = set(obj)
    is_seal = obj.get("op") == OP_SEAL
    if keys != (_FIELDS | {"sig"} if is_seal else _FIELDS):
        raise _bad(index, f"unexpected field set {sorted(keys)}")
    if canonical_json(obj) != line:
        raise _bad(index, "not in canonical form (edited)")
    seq, t, actor, op, subject, prev = (
        obj[k] for k in ("seq", "time", "actor", "op", "subject", "prev")
    )
    if obj["v"] != FORMAT_VERSION:
        raise _bad(index, f"unsupported record version {obj['v']!r}")
    for name, v in (("seq", seq), ("time", t)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise _bad(index, f"{name} must be a non-negative integer")
    if not isinstance(actor, str) or not isinstance(op, str) or not op:
        raise _bad(index, "actor/op must be strings")
    if not isinstance(subject, dict):
        raise _bad(index, "subject must be an object")
    if not isinstance(prev, str) or not _HEX64.match(prev):
        raise _bad(index, "prev must be 64 lowercase hex digits")
    sig: bytes | None = None
    if is_seal:
        s = obj["sig"]
        if not isinstance(s, str) or not _HEX.match(s):
            raise _bad(index, "seal signature must be lowercase hex", ErrorCode.AUDIT_SEAL)
        sig = bytes.fromhex(s)
    return AuditRecord(seq, t, actor, op, subject, prev, record_hash(line), sig)


def iter_lines(path: str | os.PathLike[str]) -> Iterator[tuple[int, bytes, bool]]:
    """Yield (index, line-without-newline, complete) for each stored line, bounded in size."""
    with open(path, "rb") as f:
        index = 0
        while True:
            raw = f.readline(MAX_RECORD + 2)
            if not raw:
                return
            complete = raw.endswith(b"\n")
            if not complete and len(raw) > MAX_RECORD:
                raise _bad(index, f"longer than {MAX_RECORD} bytes")
            yield index, raw[:-1] if complete else raw, complete
            index += 1


def read_records(path: str | os.PathLike[str]) -> Iterator[AuditRecord]:
    """Parse records without verifying the chain (``audit show``). Torn lines raise."""
    for index, line, complete in iter_lines(path):
        if not complete:
            raise _bad(index, "torn last line (incomplete write)")
        yield parse_record(line, index)


# --- verification -------------------------------------------------------------------------------


def _seal_payload(rec: AuditRecord) -> bytes:
    return canonical_json(
        {
            "v": FORMAT_VERSION,
            "seq": rec.seq,
            "time": rec.time,
            "actor": rec.actor,
            "op": rec.op,
            "subject": rec.subject,
            "prev": rec.prev,
        }
    )


def _check_seal(
    rec: AuditRecord,
    index: int,
    prev_seal: int | None,
    keys: dict[bytes, PublicKey],
    check_key: Callable[[PublicKey, int], None] | None = None,
) -> str:
    assert rec.sig is not None
    first = 0 if prev_seal is None else prev_seal + 1
    if rec.subject.get("first") != first or rec.subject.get("last") != index - 1:
        raise _bad(index, "seal does not cover the records since the previous seal")
    try:
        s1 = decode_sign1(rec.sig, tag_required=True)
    except OtaError as err:
        raise _bad(
            index, f"seal signature unreadable: {err.detail}", ErrorCode.AUDIT_SEAL
        ) from None
    kid = s1.kid
    key = keys.get(kid) if kid is not None else None
    if key is None:
        raise _bad(
            index,
            f"sealed by untrusted key {kid.hex() if kid else None}",
            ErrorCode.AUDIT_SEAL,
        )
    if rec.subject.get("kid") != key.key_id.hex():
        raise _bad(index, "seal subject names a different key", ErrorCode.AUDIT_SEAL)
    try:
        s1.verify(key, _seal_payload(rec))
    except OtaError:
        raise _bad(
            index, "seal signature does not verify (forged seal)", ErrorCode.AUDIT_SEAL
        ) from None
    if check_key is not None:
        try:
            check_key(key, rec.time)
        except OtaError as err:
            raise _bad(index, f"seal key not valid for this seal: {err.detail}", err.code) from None
    return key.key_id.hex()


def verify_log(
    path: str | os.PathLike[str],
    trusted: Sequence[PublicKey],
    *,
    allow_unsealed_tail: bool = False,
    expect_head: AuditHead | None = None,
    allow_torn_tail: bool = False,
    check_seal_key: Callable[[PublicKey, int], None] | None = None,
) -> AuditReport:
    """Check the whole chain and every seal; raise AuditError naming the first bad record.

    ``expect_head`` is an out-of-band anchor (the service's last known record): the log must
    contain that record with that hash, which is the only defence against truncation back to
    an earlier seal. With ``allow_unsealed_tail`` records after the last seal are a warning
    (a live log) instead of an E_AUDIT_SEAL error (a closed log must end with a seal).
    ``check_seal_key(key, time)`` may refuse a seal key at a seal's time (its authorization's
    validity window: :func:`.audit_key.seal_window_check`).
    """
    keys = {k.key_id: k for k in trusted}
    report = AuditReport()
    expected_prev = ZERO_HASH
    last_seal: int | None = None
    head: AuditHead | None = None
    try:
        for index, line, complete in iter_lines(path):
            if not complete:
                if allow_torn_tail:
                    report.warnings.append(f"record {index}: torn last line ignored")
                    break
                raise _bad(index, "torn last line (incomplete write, or truncated mid-record)")
            rec = parse_record(line, index)
            if rec.seq != index:
                if rec.seq > index:
                    what = f"found seq {rec.seq}: record(s) {index}..{rec.seq - 1} deleted"
                else:
                    what = f"found seq {rec.seq}: records reordered or duplicated"
                raise _bad(index, what)
            if rec.prev != expected_prev:
                if index == 0:
                    raise _bad(0, "first record does not start a chain")
                raise _bad(
                    index - 1,
                    f"hash does not match the link in record {index} (record {index - 1} "
                    f"edited, or record {index}'s link)",
                )
            if index == 0:
                if rec.op != OP_OPEN or not isinstance(rec.subject.get("log_id"), str):
                    raise _bad(0, "first record must be log-open with a log_id")
                report.log_id = rec.subject["log_id"]
                cont = rec.subject.get("continues")
                if cont is not None:
                    if not (
                        isinstance(cont, dict)
                        and isinstance(cont.get("log_id"), str)
                        and isinstance(cont.get("head"), str)
                    ):
                        raise _bad(0, "malformed 'continues' in log-open")
                    report.continues = {"log_id": cont["log_id"], "head": cont["head"]}
            elif rec.op == OP_OPEN:
                raise _bad(index, "log-open record inside the log (spliced logs?)")
            if rec.op == OP_SEAL:
                if rec.subject.get("log_id") != report.log_id:
                    raise _bad(index, "seal belongs to another log", ErrorCode.AUDIT_SEAL)
                kid = _check_seal(rec, index, last_seal, keys, check_seal_key)
                if kid not in report.seal_key_ids:
                    report.seal_key_ids.append(kid)
                last_seal = index
                report.seals += 1
            if (
                expect_head is not None
                and index == expect_head.seq
                and rec.hash != expect_head.hash
            ):
                raise _bad(index, "does not match the anchor kept by the signing service")
            expected_prev = rec.hash
            head = AuditHead(index, rec.hash)
            report.records = index + 1
    except FileNotFoundError:
        raise AuditError(ErrorCode.NOT_FOUND, f"{path} does not exist") from None
    if head is None:
        raise AuditError(ErrorCode.AUDIT_SEAL, "log is empty (truncated to nothing?)", record=0)
    report.head = head
    report.last_seal = last_seal
    if expect_head is not None and head.seq < expect_head.seq:
        raise AuditError(
            ErrorCode.AUDIT_SEAL,
            f"log ends at record {head.seq} but the anchor says record {expect_head.seq} "
            f"exists: records {head.seq + 1}..{expect_head.seq} were truncated",
            record=head.seq + 1,
        )
    first_unsealed = 0 if last_seal is None else last_seal + 1
    if first_unsealed < report.records:
        report.first_unsealed = first_unsealed
        msg = (
            f"records {first_unsealed}..{report.records - 1} are not covered by a seal "
            "(their tail could be truncated undetected)"
        )
        if not allow_unsealed_tail:
            raise AuditError(
                ErrorCode.AUDIT_SEAL, f"record {first_unsealed}: {msg}", first_unsealed
            )
        report.warnings.append(msg)
    return report


# --- writing ------------------------------------------------------------------------------------


class AuditLog:
    """Appends records to one log file. Safe across processes (flock) and crashes (fsync).

    Every append takes an exclusive ``flock`` on the file; if another process appended since
    our last write, the new records are verified before we chain onto them. A torn last line
    (a crash mid-write) stops all appends until :meth:`open` is called with ``recover=True``,
    which truncates the torn bytes and records their length and hash in a
    ``recover-torn-tail`` record, so the repair itself is audited.
    """

    def __init__(
        self,
        path: Path,
        sealer: Signer | None,
        trusted: Sequence[PublicKey],
        seal_every: int,
        clock: Callable[[], float],
    ) -> None:
        self.path = path
        self._sealer = sealer
        self._trusted = list(trusted)
        self._seal_every = max(1, seal_every)
        self._clock = clock
        self._fd = -1
        self._size = -1
        self._head = AuditHead(-1, ZERO_HASH)
        self._last_seal: int | None = None
        self._log_id = ""

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        sealer: Signer | None,
        *,
        trusted: Sequence[PublicKey] = (),
        seal_every: int = DEFAULT_SEAL_EVERY,
        clock: Callable[[], float] = time.time,
        recover: bool = False,
        actor: str = SEAL_ACTOR,
        continues: dict[str, str] | None = None,
    ) -> AuditLog:
        """Open (creating if absent) after verifying the existing chain and seals.

        ``trusted`` adds seal keys other than the sealer's own (e.g. a rotated-out key).
        """
        keys = list(trusted)
        if sealer is not None and sealer.public_key not in keys:
            keys.append(sealer.public_key)
        log = cls(Path(path), sealer, keys, seal_every, clock)
        log.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(log.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        log._fd = fd
        try:
            with log._locked():
                if os.fstat(fd).st_size == 0:
                    log._size = 0
                    genesis: dict[str, Any] = {
                        "log_id": secrets.token_hex(16),
                        "format": FORMAT_VERSION,
                    }
                    if continues is not None:
                        genesis["continues"] = continues
                    log._write(actor, OP_OPEN, genesis)
                else:
                    log._rescan(recover=recover, actor=actor)
        except BaseException:
            os.close(fd)
            log._fd = -1
            raise
        return log

    # --- public ------------------------------------------------------------------------------
    @property
    def head(self) -> AuditHead:
        return self._head

    @property
    def log_id(self) -> str:
        return self._log_id

    @property
    def trusted(self) -> list[PublicKey]:
        """Seal keys this writer accepts (its own sealer's plus any given at open)."""
        return list(self._trusted)

    def append(self, actor: str, op: str, subject: dict[str, Any]) -> AuditHead:
        """Append one record (and a seal when due); return the new record's anchor."""
        if op in (OP_SEAL, OP_OPEN, OP_RECOVER):
            raise AuditError(ErrorCode.USAGE, f"{op!r} records are written by the log itself")
        with self._locked():
            self._sync()
            head = self._write(actor, op, subject)
            since = head.seq - (-1 if self._last_seal is None else self._last_seal)
            if self._sealer is not None and since >= self._seal_every:
                self._write_seal()
            return head

    def seal(self) -> AuditHead | None:
        """Seal now if anything is unsealed; return the seal's anchor."""
        with self._locked():
            self._sync()
            if self._last_seal == self._head.seq:
                return None
            return self._write_seal()

    def close(self) -> None:
        """Seal the tail (a closed log must end with a seal) and release the file."""
        if self._fd < 0:
            return
        try:
            if self._sealer is not None:
                self.seal()
        finally:
            os.close(self._fd)
            self._fd = -1

    def rotate(self, new_path: str | os.PathLike[str]) -> AuditLog:
        """Seal and close this file; start ``new_path`` whose genesis names this log's id and
        final head, so the files form one chain (verify each; match ``continues``)."""
        if Path(new_path).exists():
            raise AuditError(ErrorCode.EXISTS, f"{new_path} already exists")
        self.close()
        return AuditLog.open(
            new_path,
            self._sealer,
            trusted=self._trusted,
            seal_every=self._seal_every,
            clock=self._clock,
            continues={"log_id": self._log_id, "head": str(self._head)},
        )

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- internals ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if self._fd < 0:
            raise AuditError(ErrorCode.STATE, "audit log is closed")
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _sync(self) -> None:
        """Under the lock: if another writer appended, verify and adopt its records."""
        if os.fstat(self._fd).st_size != self._size:
            self._rescan(recover=False, actor=SEAL_ACTOR)

    def _rescan(self, *, recover: bool, actor: str) -> None:
        report = verify_log(
            self.path, self._trusted, allow_unsealed_tail=True, allow_torn_tail=recover
        )
        assert report.head is not None and report.log_id is not None
        torn = bool(report.warnings and "torn" in report.warnings[0])
        self._head = report.head
        self._last_seal = report.last_seal
        self._log_id = report.log_id
        good_size = self._size_through(report.records)
        if torn:
            with open(self.path, "rb") as f:
                f.seek(good_size)
                torn_bytes = f.read(MAX_RECORD + 2)
            os.ftruncate(self._fd, good_size)
            os.fsync(self._fd)
            self._size = good_size
            self._write(
                actor,
                OP_RECOVER,
                {
                    "discarded_bytes": len(torn_bytes),
                    "sha256": hashlib.sha256(torn_bytes).hexdigest(),
                },
            )
        else:
            self._size = good_size

    def _size_through(self, records: int) -> int:
        size = 0
        for index, line, complete in iter_lines(self.path):
            if index >= records or not complete:
                break
            size += len(line) + 1
        return size

    def _record(self, actor: str, op: str, subject: dict[str, Any]) -> dict[str, Any]:
        return {
            "v": FORMAT_VERSION,
            "seq": self._head.seq + 1,
            "time": int(self._clock()),
            "actor": actor,
            "op": op,
            "subject": subject,
            "prev": self._head.hash,
        }

    def _write(self, actor: str, op: str, subject: dict[str, Any]) -> AuditHead:
        return self._write_line(self._record(actor, op, subject))

    def _write_line(self, obj: dict[str, Any]) -> AuditHead:
        line = canonical_json(obj)
        if len(line) > MAX_RECORD:
            raise AuditError(ErrorCode.TOO_LARGE, f"audit record over {MAX_RECORD} bytes")
        data = line + b"\n"
        view = memoryview(data)
        while view:
            n = os.write(self._fd, view)
            view = view[n:]
        os.fsync(self._fd)
        self._size += len(data)
        self._head = AuditHead(obj["seq"], record_hash(line))
        if obj["seq"] == 0:
            self._log_id = obj["subject"]["log_id"]
            with contextlib.suppress(OSError):
                dfd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        return self._head

    def _write_seal(self) -> AuditHead:
        assert self._sealer is not None
        first = 0 if self._last_seal is None else self._last_seal + 1
        subject = {
            "first": first,
            "last": self._head.seq,
            "kid": self._sealer.public_key.key_id.hex(),
            "alg": int(self._sealer.alg),
            "log_id": self._log_id,
        }
        obj = self._record(SEAL_ACTOR, OP_SEAL, subject)
        s1 = sign1(self._sealer, canonical_json(obj), detached=True)
        obj["sig"] = s1.encode().hex()
        head = self._write_line(obj)
        self._last_seal = head.seq
        return head
