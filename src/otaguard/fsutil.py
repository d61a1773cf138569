"""Crash-safe file writes: nothing half-written is ever left at the destination path."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from .errors import ErrorCode, OtaError


def atomic_write(
    path: str | os.PathLike[str], data: bytes, *, mode: int = 0o644, overwrite: bool = True
) -> None:
    """Write to a temp file in the same directory, fsync, then rename over ``path``."""
    dest = Path(path)
    if not overwrite and dest.exists():
        raise OtaError(ErrorCode.EXISTS, f"{dest} already exists; refusing to overwrite")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        if not overwrite:
            # link() fails if the destination appeared meanwhile: no silent clobbering.
            try:
                os.link(tmp, dest)
            except FileExistsError:
                raise OtaError(ErrorCode.EXISTS, f"{dest} already exists") from None
            os.unlink(tmp)
        else:
            os.replace(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def fsync_dir(directory: Path) -> None:
    """Make a created, renamed or removed entry in ``directory`` durable (best effort)."""
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def read_limited(path: str | os.PathLike[str], limit: int) -> bytes:
    """Read a whole file, refusing anything larger than ``limit`` before reading it."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if size > limit:
            raise OtaError(ErrorCode.TOO_LARGE, f"{p} is {size} bytes; limit is {limit}")
        with p.open("rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise OtaError(ErrorCode.NOT_FOUND, f"{p} does not exist") from None
    except IsADirectoryError:
        raise OtaError(ErrorCode.USAGE, f"{p} is a directory") from None
    if len(data) > limit:
        raise OtaError(ErrorCode.TOO_LARGE, f"{p} grew past the limit of {limit} bytes")
    return data


def private_file(path: str | os.PathLike[str]) -> Path:
    """Create ``path`` (and its directory) readable by its owner only, before a database
    library opens it: SQLite creates its file with the process umask (world-readable), and
    gives its -wal/-shm files the main file's mode. An existing file is made private too."""
    p = Path(path)
    if not p.parent.exists():
        p.parent.mkdir(parents=True, mode=0o700)
    fd = os.open(p, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    return p
