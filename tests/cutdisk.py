"""Power cuts for code that writes files: a fault-injecting layer under ``os``.

The Linux backend's state writes are file operations (temp file + fsync + rename for records,
in-place ``pwrite`` + ``fsync`` for GRUB's env copies and the slot partitions, ``O_APPEND``
for the outbox). While a :class:`CutDisk` is active it stands between that code and ``os``:
every mutating operation on a file under one of its roots is one *operation* with a global
index (as :class:`otaguard.device.faults.FaultInjector` counts flash operations), and at
operation *k* the power goes out.

What a power loss may leave is modelled the way a journaling file system (ext4,
``data=ordered``) and a disk behave:

* a write that was not followed by an ``fsync`` of its file may be lost, and a create,
  rename, link or unlink that was not followed by an ``fsync`` of its directory may be lost;
  the disk keeps every operation up to the last one made durable, and of the operations after
  it a *prefix* (``keep``: all of them reached the disk; ``lose``: none did; ``half``: the
  earlier half did) — an ordered journal never lands a later operation without the earlier —
  or (``meta``) every metadata change but none of the unsynced data (the zero-length file
  after a rename without an fsync of the data first: ext4 ``data=writeback``, XFS);
* the cut operation itself did not happen (``before``), happened (``after``), or — for a
  data write larger than one 512-byte sector — happened for a whole number of its leading
  sectors only (``torn``);
* after the cut nothing else reaches the disk: every later mutating call raises
  :class:`~otaguard.errors.PowerCut` again without doing anything (a dead machine runs no
  cleanup handlers), while reads keep working so the failing code can unwind.

Files outside the roots (pytest's own files, the tmpfs run directory) pass straight through.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from otaguard.errors import ErrorCode, PowerCut

CutMode = Literal["before", "torn", "after"]
Keep = Literal["keep", "half", "lose", "meta"]
SECTOR = 512

_real = {
    name: getattr(os, name)
    for name in (
        "open",
        "close",
        "fdopen",
        "write",
        "pwrite",
        "fsync",
        "replace",
        "rename",
        "link",
        "unlink",
    )
}


@dataclass(frozen=True)
class CutPlan:
    at: int
    mode: CutMode = "before"
    keep: Keep = "lose"


@dataclass
class _Undo:
    """One not-yet-durable change and how to take it back."""

    kind: str  # data | create | replace | link | unlink
    durable_by: tuple[str, int]  # ("ino", inode) for data, ("dir", path) for metadata
    path: str
    offset: int = 0
    old: bytes | None = None
    old_size: int = 0
    src: str = ""
    mode: int = 0o600


@dataclass
class CutDisk:
    roots: tuple[Path, ...]
    plan: CutPlan | None = None
    ops: int = 0
    fired: bool = False
    kinds: dict[str, int] = field(default_factory=dict)
    # per operation: kind, bytes written, unsynced changes before it, and after it
    trace: list[list[Any]] = field(default_factory=list)
    _fds: dict[int, str] = field(default_factory=dict)
    _pending: list[_Undo] = field(default_factory=list)

    # --- bookkeeping -------------------------------------------------------------------------
    def _tracked(self, path: str) -> bool:
        return any(path == str(r) or path.startswith(str(r) + os.sep) for r in self.roots)

    def _op(self, kind: str, size: int = 0) -> CutMode | None:
        """Account one operation; PowerCut if the machine is already dead."""
        if self.fired:
            raise PowerCut(ErrorCode.POWER_CUT, "the machine is off")
        index = self.ops
        self.ops += 1
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        self.trace.append([kind, size, self._counts(), None])
        if self.plan is not None and index == self.plan.at:
            self.fired = True
            return self.plan.mode
        return None

    def _counts(self) -> tuple[int, int]:
        """(unsynced changes, of which metadata)"""
        return len(self._pending), sum(u.kind != "data" for u in self._pending)

    def _done(self) -> None:
        self.trace[-1][3] = self._counts()

    def _cut(self) -> PowerCut:
        return PowerCut(ErrorCode.POWER_CUT, f"power cut at file operation {self.ops - 1}")

    def crash(self) -> None:
        """What the disk holds after the lights went out: undo the unsynced suffix."""
        keep = self.plan.keep if self.plan is not None else "keep"
        n = len(self._pending)
        if keep == "meta":  # the journal landed, the unsynced data blocks did not
            lost = [u for u in self._pending if u.kind == "data"]
        else:
            lost = self._pending[{"keep": n, "half": n // 2, "lose": 0}[keep] :]
        for u in reversed(lost):
            self._undo(u)
        self._pending.clear()

    def _where(self, ino: int) -> str | None:
        """The current name of a file (it may have been renamed since it was written)."""
        for r in self.roots:
            for p in [r, *(r.iterdir() if r.is_dir() else ())]:
                if p.is_file() and p.stat().st_ino == ino:
                    return str(p)
        return None

    def _undo(self, u: _Undo) -> None:
        if u.kind == "data":
            path = self._where(u.durable_by[1])
            if path is None:
                return  # unlinked for good: nothing of it is left to damage
            fd = _real["open"](path, os.O_RDWR)
            try:
                assert u.old is not None
                os.ftruncate(fd, u.old_size)
                if u.old:
                    os.pwrite(fd, u.old, u.offset)
            finally:
                _real["close"](fd)
        elif u.kind in ("create", "link"):
            _real["unlink"](u.path)
        elif u.kind == "replace":
            _real["rename"](u.path, u.src)
            if u.old is not None:
                _restore(u.path, u.old, u.mode)
        elif u.kind == "unlink":
            assert u.old is not None
            _restore(u.path, u.old, u.mode)

    def _durable(self, key: tuple[str, int]) -> None:
        self._pending = [u for u in self._pending if u.durable_by != key]

    # --- the os functions --------------------------------------------------------------------
    def open(self, path: Any, flags: int, mode: int = 0o777, *a: Any, **kw: Any) -> int:
        p = os.path.abspath(os.fspath(path))
        if not self._tracked(p):
            return int(_real["open"](path, flags, mode, *a, **kw))
        creates = bool(flags & os.O_CREAT) and not os.path.exists(p)
        if creates:
            cut = self._op("create")
            if cut == "before":
                raise self._cut()
        fd = int(_real["open"](path, flags, mode, *a, **kw))
        if creates:
            self._pending.append(_Undo("create", ("dir", _dir_key(p)), p))
            if self.fired:
                _real["close"](fd)
                raise self._cut()
            self._done()
        self._fds[fd] = p
        return fd

    def close(self, fd: int) -> None:
        self._fds.pop(fd, None)
        _real["close"](fd)

    def fdopen(self, fd: int, mode: str = "r", *a: Any, **kw: Any) -> Any:
        if fd in self._fds and ("w" in mode or "a" in mode or "+" in mode):
            return _File(self, fd)
        return _real["fdopen"](fd, mode, *a, **kw)

    def pwrite(self, fd: int, data: Any, offset: int) -> int:
        if fd not in self._fds:
            return int(_real["pwrite"](fd, data, offset))
        return self._write(fd, bytes(data), offset)

    def write(self, fd: int, data: Any) -> int:
        if fd not in self._fds:
            return int(_real["write"](fd, data))
        # O_APPEND or not, the model writes at the position the kernel would
        flags = _fcntl_flags(fd)
        off = os.fstat(fd).st_size if flags & os.O_APPEND else os.lseek(fd, 0, os.SEEK_CUR)
        n = self._write(fd, bytes(data), off)
        os.lseek(fd, off + n, os.SEEK_SET)
        return n

    def _write(self, fd: int, data: bytes, offset: int) -> int:
        cut = self._op("write", len(data))
        if cut == "before":
            raise self._cut()
        if cut == "torn":
            sectors = (len(data) - 1) // SECTOR
            data = data[: max(1, (sectors + 1) // 2) * SECTOR] if sectors else b""
        st = os.fstat(fd)
        rfd = _real["open"](self._fds[fd], os.O_RDONLY)  # fd may be write-only
        try:
            old = os.pread(rfd, len(data), offset)
        finally:
            _real["close"](rfd)
        self._pending.append(
            _Undo("data", ("ino", st.st_ino), self._fds[fd], offset, old, st.st_size)
        )
        n = int(_real["pwrite"](fd, data, offset)) if data else 0
        if cut is not None:
            raise self._cut()
        self._done()
        return n

    def fsync(self, fd: int) -> None:
        if fd not in self._fds:
            _real["fsync"](fd)
            return
        cut = self._op("fsync")
        if cut == "before":
            raise self._cut()
        p = self._fds[fd]
        if os.path.isdir(p):
            self._durable(("dir", _dir_key(os.path.join(p, "x"))))
        else:
            self._durable(("ino", os.fstat(fd).st_ino))
        if cut is not None:
            raise self._cut()
        self._done()

    def replace(self, src: Any, dst: Any, **kw: Any) -> None:
        s, d = os.path.abspath(os.fspath(src)), os.path.abspath(os.fspath(dst))
        if not self._tracked(d):
            _real["replace"](src, dst, **kw)
            return
        cut = self._op("rename")
        if cut == "before":
            raise self._cut()
        old, mode = _snapshot(d)
        self._pending.append(_Undo("replace", ("dir", _dir_key(d)), d, old=old, src=s, mode=mode))
        _real["replace"](src, dst, **kw)
        if cut is not None:
            raise self._cut()
        self._done()

    rename = replace

    def link(self, src: Any, dst: Any, **kw: Any) -> None:
        d = os.path.abspath(os.fspath(dst))
        if not self._tracked(d):
            _real["link"](src, dst, **kw)
            return
        cut = self._op("link")
        if cut == "before":
            raise self._cut()
        _real["link"](src, dst, **kw)
        self._pending.append(_Undo("link", ("dir", _dir_key(d)), d))
        if cut is not None:
            raise self._cut()
        self._done()

    def unlink(self, path: Any, **kw: Any) -> None:
        p = os.path.abspath(os.fspath(path))
        if not self._tracked(p):
            _real["unlink"](path, **kw)
            return
        if not os.path.exists(p):
            _real["unlink"](path, **kw)  # FileNotFoundError, as the kernel would say
            return
        cut = self._op("unlink")
        if cut == "before":
            raise self._cut()
        old, mode = _snapshot(p)
        _real["unlink"](path, **kw)
        self._pending.append(_Undo("unlink", ("dir", _dir_key(p)), p, old=old, mode=mode))
        if cut is not None:
            raise self._cut()
        self._done()

    def cases(self, k: int) -> list[tuple[CutMode, Keep]]:
        """The distinct outcomes of a cut at operation ``k`` of a traced (uncut) run: a tear
        only for a write of more than one sector, and losing unsynced changes only when there
        are any (``half`` only when there are two or more)."""
        kind, size, pre, post = self.trace[k]
        out: list[tuple[CutMode, Keep]] = []
        for mode, (pending, meta) in (("before", pre), ("torn", post), ("after", post)):
            if mode == "torn" and not (kind == "write" and size > SECTOR):
                continue
            out.append((mode, "keep"))  # type: ignore[arg-type]
            if pending >= 2:
                out.append((mode, "half"))  # type: ignore[arg-type]
            if pending >= 1:
                out.append((mode, "lose"))  # type: ignore[arg-type]
            if meta and pending > meta:
                out.append((mode, "meta"))  # type: ignore[arg-type]
        return out

    @contextmanager
    def active(self) -> Iterator[CutDisk]:
        """Route ``os`` through this disk; on leaving, apply what the cut lost."""
        saved = {name: getattr(os, name) for name in _real}
        for name in _real:
            setattr(os, name, getattr(self, name))
        try:
            yield self
        finally:
            for name, fn in saved.items():
                setattr(os, name, fn)
            if self.fired:
                self.crash()
            self._pending.clear()
            self._fds.clear()


class _File:
    """What ``os.fdopen(fd, "wb")`` returns for a tracked file: writes go through the disk."""

    def __init__(self, disk: CutDisk, fd: int) -> None:
        self.disk = disk
        self.fd = fd

    def write(self, data: bytes) -> int:
        view = bytes(data)
        while view:
            n = self.disk.write(self.fd, view)
            view = view[n:]
        return len(data)

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        if self.fd >= 0:
            self.disk.close(self.fd)
            self.fd = -1

    def __enter__(self) -> _File:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _dir_key(path: str) -> int:
    return os.stat(os.path.dirname(path)).st_ino


def _snapshot(path: str) -> tuple[bytes | None, int]:
    try:
        with open(path, "rb") as f:
            return f.read(), os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return None, 0o600


def _restore(path: str, data: bytes, mode: int) -> None:
    fd = _real["open"](path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.pwrite(fd, data, 0)
    finally:
        _real["close"](fd)
    os.chmod(path, mode)


def _fcntl_flags(fd: int) -> int:
    import fcntl

    return fcntl.fcntl(fd, fcntl.F_GETFL)


def report(backend: str, scenario: str, ops: int, points: int, cases: int, full: bool) -> None:
    """One result line, printed and (``make powercut``) appended to the run's totals file."""
    line = (
        f"powercut backend={backend} scenario={scenario} ops={ops} cut_points={points} "
        f"cases={cases} bricked=0 {'all' if full else 'sampled'}"
    )
    print("\n" + line)
    out = os.environ.get("OTAGUARD_POWERCUT_REPORT")
    if out:
        with open(out, "a") as f:
            f.write(line + "\n")
