"""Content-addressed blob store for manifests and images.

A blob is named by the SHA-256 of its bytes, so a stored name can always be re-checked and the
same image uploaded twice is stored once. Serving blobs from an untrusted store (a CDN, S3) is
safe because devices verify the signed manifest's digest, never the store's word.

:class:`BlobStore` is the interface; :class:`LocalBlobStore` keeps blobs in a directory
(``ab/cd/abcd…``) and writes them atomically (temp file + fsync + rename), so a crash never
leaves a partial blob under its final name. An S3-compatible store implements the same five
methods (``put_stream`` as a multipart upload, ``open_range`` as a ranged GET).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from ...errors import ErrorCode, OtaError, ServerError

CHUNK = 256 * 1024
_NAME = re.compile(r"\A[0-9a-f]{64}\Z")


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ServerError(ErrorCode.MALFORMED, "blob name must be 64 lowercase hex digits", 400)
    return name


class BlobStore(Protocol):
    def put(self, data: bytes) -> str: ...

    def put_stream(self, chunks: Iterable[bytes], max_size: int) -> tuple[str, int]: ...

    def size(self, name: str) -> int | None: ...

    def read(self, name: str, max_size: int) -> bytes: ...

    def open_range(self, name: str, start: int, end: int) -> Iterator[bytes]: ...


class LocalBlobStore:
    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(exist_ok=True)

    def path(self, name: str) -> Path:
        check_name(name)
        return self.root / name[:2] / name[2:4] / name

    def _commit(self, tmp: str, name: str) -> None:
        dest = self.path(name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.chmod(tmp, 0o444)
        os.replace(tmp, dest)  # same content under the same name: replacing is harmless
        with contextlib.suppress(OSError):
            dfd = os.open(dest.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    def put(self, data: bytes) -> str:
        name, _ = self.put_stream([data], len(data))
        return name

    def put_stream(self, chunks: Iterable[bytes], max_size: int) -> tuple[str, int]:
        spool = _Spool(self, max_size)
        try:
            for chunk in chunks:
                spool.write(chunk)
            return spool.commit()
        finally:
            spool.discard()

    async def put_async(self, chunks: AsyncIterator[bytes], max_size: int) -> tuple[str, int]:
        """Spool an async body to a temp file in bounded memory, then commit by digest."""
        spool = _Spool(self, max_size)
        try:
            async for chunk in chunks:
                spool.write(chunk)
            return spool.commit()
        finally:
            spool.discard()

    def size(self, name: str) -> int | None:
        try:
            return self.path(name).stat().st_size
        except FileNotFoundError:
            return None

    def read(self, name: str, max_size: int) -> bytes:
        p = self.path(name)
        try:
            with p.open("rb") as f:
                data = f.read(max_size + 1)
        except FileNotFoundError:
            raise OtaError(ErrorCode.NOT_FOUND, f"blob {name} not found") from None
        if len(data) > max_size:
            raise OtaError(ErrorCode.TOO_LARGE, f"blob {name} is over {max_size} bytes")
        return data

    def open_range(self, name: str, start: int, end: int) -> Iterator[bytes]:
        """Yield bytes ``start`` .. ``end`` inclusive, in chunks."""
        f: BinaryIO = self.path(name).open("rb")
        try:
            f.seek(start)
            left = end - start + 1
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                yield chunk
        finally:
            f.close()

    def probe(self) -> None:
        """Write, read back and remove a small file under the root (the health check): raises
        OSError when the store cannot take a new blob (read-only, full, permissions)."""
        fd, tmp = tempfile.mkstemp(prefix="health.", dir=self._tmp)
        try:
            os.write(fd, b"ok")
            os.lseek(fd, 0, os.SEEK_SET)
            if os.read(fd, 2) != b"ok":
                raise OSError("blob store probe read back different bytes")
        finally:
            os.close(fd)
            os.unlink(tmp)

    def verify(self, name: str) -> bool:
        """Re-hash a stored blob (for a periodic scrub): does it still match its name?"""
        h = hashlib.sha256()
        size = self.size(name)
        if size is None:
            return False
        for chunk in self.open_range(name, 0, max(size - 1, 0)):
            h.update(chunk)
        return h.hexdigest() == name


class _Spool:
    """A temp file in the store that hashes what it is given; committed under its digest."""

    def __init__(self, store: LocalBlobStore, max_size: int) -> None:
        self._store = store
        self._max = max_size
        self._h = hashlib.sha256()
        self.total = 0
        fd, self._tmp = tempfile.mkstemp(prefix="blob.", dir=store._tmp)
        self._f = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        self.total += len(chunk)
        if self.total > self._max:
            raise ServerError(
                ErrorCode.TOO_LARGE, f"blob exceeds the limit of {self._max} bytes", 413
            )
        self._h.update(chunk)
        self._f.write(chunk)

    def commit(self) -> tuple[str, int]:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        name = self._h.hexdigest()
        if not self._store.path(name).exists():
            self._store._commit(self._tmp, name)
        return name, self.total

    def discard(self) -> None:
        """Remove the temp file unless it was committed (renamed away)."""
        if not self._f.closed:
            self._f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)
