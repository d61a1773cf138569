"""Content-addressed blob store for manifests, images and patches.

A blob is named by the SHA-256 of its bytes, so a stored name can always be re-checked and the
same image uploaded twice is stored once. Devices verify the signed manifest's digest, never
the store's word; the server still never hands out bytes whose digest is not their name: a
store that bit-rots or is tampered with (an S3 bucket with too many writers) must not turn
the update server into the thing that distributes the corruption.

:class:`BlobStore` is the one interface; :class:`LocalBlobStore` keeps blobs in a directory
(``ab/cd/abcd…``) and writes them atomically (temp file + fsync + rename), so a crash never
leaves a partial blob under its final name; :class:`~.blobs_s3.S3BlobStore` keeps the same
layout in an S3-compatible bucket. Both raise the same errors: ``E_NOT_FOUND`` for a blob that
is missing or whose bytes no longer match its name (logged as an error: the database says it
should be there), ``E_STORAGE`` (503, "retry later") when the store itself cannot be reached.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tempfile
import threading
import time
import zlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Hashable, Iterable, Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from ...errors import ErrorCode, OtaError, ServerError

CHUNK = 256 * 1024
_NAME = re.compile(r"\A[0-9a-f]{64}\Z")
# A blob verified on this node is re-hashed after this long even if its version token did not
# change (bit-rot under an unchanged mtime or ETag).
REVERIFY_AFTER = 24 * 3600.0

log = logging.getLogger("otaguard.server")


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ServerError(ErrorCode.MALFORMED, "blob name must be 64 lowercase hex digits", 400)
    return name


def blob_key(name: str) -> str:
    """The blob's relative path (``ab/cd/abcd…``), the same in a directory and in a bucket,
    so a local store copied into a bucket (``aws s3 sync``) is an S3 store."""
    check_name(name)
    return f"{name[:2]}/{name[2:4]}/{name}"


def unavailable(what: str, exc: BaseException | str) -> ServerError:
    """The store cannot be reached or used right now: 503 E_STORAGE (with Retry-After)."""
    log.error("blob store unavailable (%s): %s", what, exc)
    return ServerError(ErrorCode.STORAGE, "blob store unavailable, retry later", 503)


EMPTY = hashlib.sha256(b"").hexdigest()


def checked_size(name: str, size: int | None) -> int | None:
    """A size as a store reports it, except that only the empty blob may be empty: callers
    serve zero bytes without a read, so a blob truncated to nothing would pass unchecked."""
    if size == 0 and name != EMPTY:
        raise missing(name, "it is empty, its name is not the empty blob's")
    return size


def missing(name: str, why: str) -> OtaError:
    """A blob the caller expected is not there, or its bytes are not its name: never served."""
    log.error("blob %s not served: %s", name, why)
    return OtaError(ErrorCode.NOT_FOUND, f"blob {name} not found")


class BlobStore(Protocol):
    """What the server needs of a blob store. Reads verify (``read`` every time, ``open_range``
    once per blob version and node, see :class:`VerifiedCache`); ``open_range`` opens
    eagerly, so a missing blob or an unreachable store is an error before any byte is sent."""

    def put(self, data: bytes) -> str: ...

    def put_stream(self, chunks: Iterable[bytes], max_size: int) -> tuple[str, int]: ...

    async def put_async(self, chunks: AsyncIterator[bytes], max_size: int) -> tuple[str, int]: ...

    def size(self, name: str) -> int | None: ...

    def read(self, name: str, max_size: int) -> bytes: ...

    def open_range(self, name: str, start: int, end: int) -> Iterator[bytes]: ...

    def probe(self) -> None: ...

    def verify(self, name: str) -> bool: ...


class Digests:
    """The SHA-256 of a whole blob and of each of its ``CHUNK``-sized pieces, in one pass.

    The piece digests are what lets the server check every byte it sends without hashing a
    whole image per range request: a range is read from the piece boundaries around it and
    each piece is compared with its digest before any of it is sent."""

    def __init__(self) -> None:
        self._whole = hashlib.sha256()
        self._pieces = bytearray()
        self._buf = bytearray()
        self.size = 0

    def update(self, data: bytes) -> None:
        self._whole.update(data)
        self.size += len(data)
        self._buf += data
        while len(self._buf) >= CHUNK:
            self._pieces += hashlib.sha256(self._buf[:CHUNK]).digest()
            del self._buf[:CHUNK]

    def finish(self) -> tuple[str, bytes]:
        """(hex SHA-256 of the whole, the pieces' digests concatenated)."""
        if self._buf or not self.size:
            self._pieces += hashlib.sha256(self._buf).digest()
            self._buf.clear()
        return self._whole.hexdigest(), bytes(self._pieces)


class Verified:
    """A blob version this node hashed and found equal to its name."""

    __slots__ = ("pieces", "size", "token")

    def __init__(self, token: Hashable, size: int, pieces: bytes) -> None:
        self.token = token
        self.size = size
        self.pieces = pieces


class VerifiedCache:
    """Which blob versions this node has hashed, with their piece digests.

    A blob is hashed whole on its first read through this node (or when this node stored it),
    under a *version token* the store can check cheaply on every request: the file's inode,
    size, mtime and ctime, or the object's ETag (sent as ``If-Match``, so S3 itself refuses a
    changed object). A changed token, or ``reverify_after`` seconds, and it is hashed again.
    Every range served is still checked piece by piece (:func:`checked_span`), so a change the
    token misses (bit-rot, an in-place write within one timestamp tick) is never sent either.
    Verifications of one blob are serialised (``lock``): a hundred devices asking for a new
    image at once cost one hash, not a hundred. Bounded by the piece digests' total size
    (32 bytes per 256 KiB: the default 64 MiB covers 512 GiB of blobs).
    """

    def __init__(
        self,
        *,
        reverify_after: float = REVERIFY_AFTER,
        max_bytes: int = 64 << 20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._entries: OrderedDict[str, tuple[Verified, float]] = OrderedDict()
        self._bytes = 0
        self._reverify = reverify_after
        self._max = max_bytes
        self._clock = clock
        self._guard = threading.Lock()
        self._locks = [threading.Lock() for _ in range(64)]

    def lock(self, name: str) -> threading.Lock:
        return self._locks[zlib.crc32(name.encode()) % len(self._locks)]

    def get(self, name: str) -> Verified | None:
        """The verified version, unless it is too old to trust without hashing again."""
        with self._guard:
            entry = self._entries.get(name)
            if entry is None:
                return None
            if self._clock() - entry[1] >= self._reverify:
                self._pop(name)
                return None
            self._entries.move_to_end(name)
            return entry[0]

    def add(self, name: str, v: Verified) -> None:
        with self._guard:
            self._pop(name)
            self._entries[name] = (v, self._clock())
            self._bytes += len(v.pieces) + 128
            while self._bytes > self._max and len(self._entries) > 1:
                self._pop(next(iter(self._entries)))

    def drop(self, name: str) -> None:
        with self._guard:
            self._pop(name)

    def _pop(self, name: str) -> None:
        entry = self._entries.pop(name, None)
        if entry is not None:
            self._bytes -= len(entry[0].pieces) + 128


def aligned(start: int, end: int, size: int) -> tuple[int, int]:
    """The piece-aligned span (inclusive) that covers bytes ``start`` .. ``end``."""
    return start - start % CHUNK, min(size, (end // CHUNK + 1) * CHUNK) - 1


def read_exact(read: Callable[[int], bytes], n: int) -> bytes:
    """``n`` bytes from a stream that may return fewer per call; short only at its end."""
    buf = read(n)
    while len(buf) < n:
        more = read(n - len(buf))
        if not more:
            break
        buf += more
    return buf


def checked_span(
    name: str,
    v: Verified,
    read: Callable[[int], bytes],
    start: int,
    end: int,
    on_bad: Callable[[], None],
) -> Iterator[bytes]:
    """Bytes ``start`` .. ``end`` of the blob, from ``read`` positioned at
    ``aligned(start, end)[0]``: each piece is compared with its digest before any of it is
    yielded. A piece that does not match (or a stream that ends early) stops the body there:
    the client sees a cut response it will resume, never wrong bytes."""
    a_start, a_end = aligned(start, end, v.size)
    pos = a_start
    while pos <= end:
        want = min(CHUNK, a_end - pos + 1)
        piece = read_exact(read, want)
        i = pos // CHUNK
        if len(piece) != want or hashlib.sha256(piece).digest() != v.pieces[32 * i : 32 * i + 32]:
            on_bad()
            raise missing(name, f"piece {i} no longer matches what was verified")
        lo = max(start - pos, 0)
        hi = min(end - pos + 1, want)
        yield piece[lo:hi]
        pos += want


class LocalBlobStore:
    def __init__(
        self, root: str | os.PathLike[str], *, verified: VerifiedCache | None = None
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._tmp = self.root / "tmp"
        self._tmp.mkdir(exist_ok=True)
        self.verified = verified or VerifiedCache()

    def path(self, name: str) -> Path:
        return self.root / blob_key(name)

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
        try:
            spool = Spool(self._tmp, max_size)
            try:
                for chunk in chunks:
                    spool.write(chunk)
                return self._finish(spool)
            finally:
                spool.discard()
        except OSError as exc:  # full, read-only, gone: the store's fault, not the upload's
            raise unavailable("write", exc) from None

    async def put_async(self, chunks: AsyncIterator[bytes], max_size: int) -> tuple[str, int]:
        """Spool an async body to a temp file in bounded memory, then commit by digest."""
        try:
            spool = Spool(self._tmp, max_size)
            try:
                async for chunk in chunks:
                    spool.write(chunk)
                return self._finish(spool)
            finally:
                spool.discard()
        except OSError as exc:
            raise unavailable("write", exc) from None

    def _finish(self, spool: Spool) -> tuple[str, int]:
        """Commit, also over an existing copy: the same name is the same bytes, and putting a
        blob again is how a damaged one is repaired (re-uploading the image is what an
        operator does about E_NOT_FOUND), even when no check has noticed the damage yet."""
        name, pieces = spool.finish()
        self._commit(spool.tmp, name)
        self.verified.add(name, Verified(_token(self.path(name).stat()), spool.total, pieces))
        return name, spool.total

    def size(self, name: str) -> int | None:
        try:
            return checked_size(name, self.path(name).stat().st_size)
        except FileNotFoundError:
            self._check_root()
            return None
        except OSError as exc:
            raise unavailable("stat", exc) from None

    def _check_root(self) -> None:
        """A missing root is a missing volume (unmounted, lost), not a missing blob."""
        if not self.root.is_dir():
            raise unavailable("root", f"{self.root} is not a directory")

    def _open(self, name: str) -> BinaryIO:
        try:
            return self.path(name).open("rb")
        except FileNotFoundError:
            self._check_root()
            raise missing(name, "not in the store") from None
        except OSError as exc:
            raise unavailable("open", exc) from None

    def read(self, name: str, max_size: int) -> bytes:
        """The whole blob (manifests: small), hashed on every read."""
        with self._open(name) as f:
            try:
                data = f.read(max_size + 1)
            except OSError as exc:
                raise unavailable("read", exc) from None
        if len(data) > max_size:
            raise OtaError(ErrorCode.TOO_LARGE, f"blob {name} is over {max_size} bytes")
        if hashlib.sha256(data).hexdigest() != name:
            raise missing(name, "its bytes no longer match its SHA-256 name")
        return data

    def open_range(self, name: str, start: int, end: int) -> Iterator[bytes]:
        """Bytes ``start`` .. ``end`` inclusive, in chunks, each piece checked against what
        was verified; opened (and hashed whole, if this version is new here) now."""
        f = self._open(name)
        try:
            with self.verified.lock(name):
                token = _token(os.fstat(f.fileno()))
                v = self.verified.get(name)
                if v is None or v.token != token:
                    v = self._verify_open(name, f, token)
            f.seek(aligned(start, end, v.size)[0])
        except OSError as exc:
            f.close()
            raise unavailable("read", exc) from None
        except BaseException:
            f.close()
            raise
        return _closing(
            f, checked_span(name, v, f.read, start, end, lambda: self.verified.drop(name))
        )

    def _verify_open(self, name: str, f: BinaryIO, token: Hashable) -> Verified:
        d = Digests()
        f.seek(0)
        while chunk := f.read(CHUNK):
            d.update(chunk)
        digest, pieces = d.finish()
        if digest != name:
            self.verified.drop(name)
            raise missing(name, "its bytes no longer match its SHA-256 name")
        v = Verified(token, d.size, pieces)
        self.verified.add(name, v)
        return v

    def names(self) -> Iterator[str]:
        """Every blob name in the store, sorted (for copying the store elsewhere)."""
        for p in sorted(self.root.glob("??/??/*")):
            if _NAME.match(p.name) and p.relative_to(self.root).as_posix() == blob_key(p.name):
                yield p.name

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
        try:
            with self.path(name).open("rb") as f:
                h = hashlib.sha256()
                while chunk := f.read(CHUNK):
                    h.update(chunk)
                return h.hexdigest() == name
        except FileNotFoundError:
            return False


def copy_blobs(src: LocalBlobStore, dst: BlobStore) -> tuple[int, int, int, list[str]]:
    """Copy every blob of a local store into another (``server migrate-blobs``), each verified
    on the way out. A name the destination holds at the same size is skipped, so a re-run
    after an interruption copies only what is left (the destination's own read verification
    still checks those bytes before serving them). A blob whose bytes no longer match its
    name is not copied. (blobs copied, bytes copied, blobs already there, damaged names)."""
    count = total = present = 0
    damaged: list[str] = []
    for name in src.names():
        try:
            size = src.size(name)
        except OtaError as err:
            if err.code != ErrorCode.NOT_FOUND:
                raise
            damaged.append(name)  # truncated to nothing
            continue
        if size is None:
            continue  # removed meanwhile
        try:
            there = dst.size(name)
        except OtaError as err:
            if err.code != ErrorCode.NOT_FOUND:
                raise
            there = None  # damaged there: overwritten below
        if there == size:
            present += 1
            continue
        try:
            chunks = src.open_range(name, 0, size - 1) if size else iter(())
            got, n = dst.put_stream(chunks, size)
        except OtaError as err:
            if err.code != ErrorCode.NOT_FOUND:
                raise
            damaged.append(name)
            continue
        if got != name:  # changed between the check and the copy
            damaged.append(name)
            continue
        count += 1
        total += n
    return count, total, present, damaged


def _token(st: os.stat_result) -> Hashable:
    """A file version: replaced, rewritten or touched files get another one."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _closing(f: BinaryIO, chunks: Iterator[bytes]) -> Iterator[bytes]:
    try:
        yield from chunks
    finally:
        f.close()


class Spool:
    """A temp file that hashes what it is given; the store commits it under its digest."""

    def __init__(self, tmp_dir: Path, max_size: int) -> None:
        self._max = max_size
        self._d = Digests()
        self.total = 0
        fd, self.tmp = tempfile.mkstemp(prefix="blob.", dir=tmp_dir)
        self._f = os.fdopen(fd, "wb")

    def write(self, chunk: bytes) -> None:
        self.total += len(chunk)
        if self.total > self._max:
            raise ServerError(
                ErrorCode.TOO_LARGE, f"blob exceeds the limit of {self._max} bytes", 413
            )
        self._d.update(chunk)
        self._f.write(chunk)

    def finish(self) -> tuple[str, bytes]:
        """Flush, fsync and close the temp file; the blob's name and piece digests."""
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return self._d.finish()

    def discard(self) -> None:
        """Remove the temp file unless it was committed (renamed away)."""
        if not self._f.closed:
            self._f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.tmp)
