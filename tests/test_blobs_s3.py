"""The blob store's behaviour, the same suite on both backends: the local directory and an
S3-compatible bucket (moto's standalone server, a real subprocess on 127.0.0.1).

Two stores on the same storage stand for two server nodes: what one stored, the other serves,
any range of it, after verifying it itself."""

# ruff: noqa: F811  (pytest fixtures imported from tests.s3server are redefined as parameters)
from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, rule

from otaguard.errors import ErrorCode, OtaError, ServerError
from otaguard.server.storage import blobs
from otaguard.server.storage.blobs import CHUNK, Digests, LocalBlobStore, Verified, checked_span
from otaguard.server.storage.blobs_s3 import S3BlobStore
from tests.s3server import MotoServer, moto_server, s3_env  # noqa: F401

FAST = {"connect_timeout": 0.5, "read_timeout": 0.5, "attempts": 1}


@dataclass
class Backend:
    kind: str
    store: Any
    node: Callable[[], Any]  # another node's store on the same storage
    tamper: Callable[[str, bytes], None]  # replace the stored bytes behind the store's back
    remove: Callable[[str], None]
    outage: Callable[[], contextlib.AbstractContextManager[None]]
    token: Callable[[str], Any]  # the stored version's token, as the store would see it


def _local(tmp: Path) -> Backend:
    root = tmp / "blobs"
    store = LocalBlobStore(root)

    def tamper(name: str, data: bytes) -> None:
        p = store.path(name)
        os.chmod(p, 0o644)
        p.write_bytes(data)  # in place, like bit-rot or an editor

    @contextlib.contextmanager
    def outage() -> Iterator[None]:
        root.rename(tmp / "unmounted")  # the volume is gone
        try:
            yield
        finally:
            (tmp / "unmounted").rename(root)

    def token(name: str) -> Any:
        return blobs._token(store.path(name).stat())

    return Backend(
        "local",
        store,
        lambda: LocalBlobStore(root),
        tamper,
        lambda name: store.path(name).unlink(),
        outage,
        token,
    )


def _s3(moto: MotoServer, tmp: Path, *, prefix: str = "fleet/blobs/") -> Backend:
    bucket = moto.new_bucket()
    raw = moto.client()

    def node() -> S3BlobStore:
        return S3BlobStore(
            bucket, spool_dir=tmp / "spool", prefix=prefix, client=moto.client(**FAST)
        )

    store = node()

    @contextlib.contextmanager
    def outage() -> Iterator[None]:
        moto.freeze()  # accepts connections, never answers: every call times out
        try:
            yield
        finally:
            moto.thaw()

    return Backend(
        "s3",
        store,
        node,
        lambda name, data: raw.put_object(Bucket=bucket, Key=store.key(name), Body=data),
        lambda name: raw.delete_object(Bucket=bucket, Key=store.key(name)),
        outage,
        lambda name: raw.head_object(Bucket=bucket, Key=store.key(name))["ETag"],
    )


@pytest.fixture(params=["local", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "local":
        yield _local(tmp_path)
        return
    request.getfixturevalue("s3_env")
    # One server per test worker, a bucket per test (the outage test freezes the server for
    # its own duration: the tests of one worker run one after the other).
    yield _s3(request.getfixturevalue("moto_server"), tmp_path)


def _pieces(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def _get(store: Any, name: str, start: int, end: int) -> bytes:
    return b"".join(store.open_range(name, start, end))


def _code(exc: pytest.ExceptionInfo[OtaError]) -> ErrorCode:
    return exc.value.code


DATA = os.urandom(3 * CHUNK + 12_345)
NAME = hashlib.sha256(DATA).hexdigest()


def test_put_then_any_node_serves_every_range(backend: Backend) -> None:
    name, size = backend.store.put_stream(_pieces(DATA, 70_000), len(DATA))
    assert (name, size) == (NAME, len(DATA))
    other = backend.node()  # never saw the upload: verifies the blob itself first
    for store in (backend.store, other):
        assert store.size(NAME) == len(DATA)
        assert store.read(NAME, len(DATA)) == DATA
        assert _get(store, NAME, 0, len(DATA) - 1) == DATA
        for start, end in [(0, 0), (5, 9), (CHUNK - 1, CHUNK), (2 * CHUNK + 7, len(DATA) - 1)]:
            assert _get(store, NAME, start, end) == DATA[start : end + 1]
        # A download cut at an odd offset and resumed from there gives the whole blob.
        cut = CHUNK + 4321
        assert _get(store, NAME, 0, cut - 1) + _get(store, NAME, cut, len(DATA) - 1) == DATA
    assert other.verify(NAME)


def test_put_is_idempotent_and_async_put_matches(backend: Backend) -> None:
    small = b"manifest bytes"
    assert backend.store.put(small) == hashlib.sha256(small).hexdigest()
    assert backend.store.put(small) == hashlib.sha256(small).hexdigest()
    assert backend.store.size(NAME) is None

    async def body() -> AsyncIterator[bytes]:
        for p in _pieces(DATA, 100_000):
            yield p

    async def put() -> tuple[str, int]:
        r: tuple[str, int] = await backend.store.put_async(body(), len(DATA))
        return r

    assert anyio.run(put) == (NAME, len(DATA))
    assert backend.store.put_stream(_pieces(DATA, 1 << 20), len(DATA)) == (NAME, len(DATA))
    assert backend.node().read(NAME, len(DATA)) == DATA
    assert backend.store.read(NAME, len(DATA)) == DATA  # its own record of the blob is current


def test_put_over_the_limit_stores_nothing(backend: Backend) -> None:
    with pytest.raises(ServerError) as exc:
        backend.store.put_stream(_pieces(DATA, 70_000), len(DATA) - 1)
    assert exc.value.code == ErrorCode.TOO_LARGE and exc.value.status == 413
    assert backend.node().size(NAME) is None


def test_missing_blob_is_not_found_and_logged(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    backend.store.put_stream(_pieces(DATA, 70_000), len(DATA))
    assert _get(backend.store, NAME, 0, 9) == DATA[:10]
    backend.remove(NAME)
    caplog.set_level(logging.ERROR, "otaguard.server")
    for store in (backend.store, backend.node()):
        with pytest.raises(OtaError) as exc:
            store.open_range(NAME, 0, 9)
        assert _code(exc) == ErrorCode.NOT_FOUND
        with pytest.raises(OtaError) as exc:
            store.read(NAME, len(DATA))
        assert _code(exc) == ErrorCode.NOT_FOUND
    assert backend.node().size(NAME) is None
    assert not backend.node().verify(NAME)
    assert any(f"blob {NAME} not served" in r.getMessage() for r in caplog.records)


def test_tampered_blob_is_never_served_and_a_new_put_repairs_it(
    backend: Backend, caplog: pytest.LogCaptureFixture
) -> None:
    backend.store.put_stream(_pieces(DATA, 70_000), len(DATA))
    assert _get(backend.store, NAME, 0, len(DATA) - 1) == DATA
    evil = bytearray(DATA)
    evil[CHUNK + 10] ^= 1
    backend.tamper(NAME, bytes(evil))
    caplog.set_level(logging.ERROR, "otaguard.server")
    for store in (backend.store, backend.node()):
        for start, end in [(0, 9), (CHUNK, CHUNK + 20)]:
            with pytest.raises(OtaError) as exc:
                _get(store, NAME, start, end)
            assert _code(exc) == ErrorCode.NOT_FOUND
        with pytest.raises(OtaError) as exc:
            store.read(NAME, len(DATA))
        assert _code(exc) == ErrorCode.NOT_FOUND
        assert not store.verify(NAME)
    assert any("no longer match" in r.getMessage() for r in caplog.records)
    # Uploading the image again is the repair.
    assert backend.store.put_stream(_pieces(DATA, 70_000), len(DATA)) == (NAME, len(DATA))
    assert _get(backend.node(), NAME, 0, len(DATA) - 1) == DATA


def test_blob_truncated_to_nothing_is_not_served_as_empty(backend: Backend) -> None:
    """Callers send zero bytes without reading, so size() itself refuses an empty blob whose
    name is not the empty blob's; the empty blob itself is fine."""
    name = backend.store.put(b"firmware")
    backend.tamper(name, b"")
    for store in (backend.store, backend.node()):
        with pytest.raises(OtaError) as exc:
            size = store.size(name)  # the S3 node that stored it still knows the real size
            assert size, "an empty size would be served without a read"
            _get(store, name, 0, size - 1)
        assert _code(exc) == ErrorCode.NOT_FOUND
    empty = backend.store.put(b"")
    assert backend.node().size(empty) == 0 and backend.node().read(empty, 10) == b""


def test_a_change_the_version_token_misses_is_stopped_at_the_bad_piece(
    backend: Backend,
) -> None:
    """Bit-rot under an unchanged mtime, or an ETag that did not change: the store believes
    its verified version is current, and the piece digests still stop the wrong bytes."""
    store = backend.store
    store.put_stream(_pieces(DATA, 70_000), len(DATA))
    evil = bytearray(DATA)
    evil[2 * CHUNK + 5] ^= 0x80
    backend.tamper(NAME, bytes(evil))
    v = store.verified.get(NAME)
    assert v is not None
    store.verified.add(NAME, Verified(backend.token(NAME), v.size, v.pieces))  # the miss
    sent = bytearray()
    with pytest.raises(OtaError) as exc:
        for chunk in store.open_range(NAME, 100, len(DATA) - 1):
            sent += chunk
    assert _code(exc) == ErrorCode.NOT_FOUND
    assert bytes(sent) == DATA[100 : 2 * CHUNK]  # everything before the bad piece, no more
    assert store.verified.get(NAME) is None  # the next request hashes it again: 404
    with pytest.raises(OtaError) as exc:
        store.open_range(NAME, 0, 9)
    assert _code(exc) == ErrorCode.NOT_FOUND


def _unavailable(fn: Callable[[], object]) -> None:
    with pytest.raises(ServerError) as exc:
        fn()
    assert exc.value.code == ErrorCode.STORAGE and exc.value.status == 503


def test_store_outage_is_e_storage_and_recovers_by_itself(backend: Backend) -> None:
    store = backend.store
    store.put_stream(_pieces(DATA, 70_000), len(DATA))
    other = backend.node()  # has verified nothing: must ask the store for everything
    with backend.outage():
        _unavailable(lambda: other.size(NAME))
        _unavailable(lambda: other.open_range(NAME, 0, 9))
        _unavailable(lambda: store.open_range(NAME, 0, 9))
        _unavailable(lambda: store.read(NAME, len(DATA)))
        _unavailable(lambda: store.put(b"while down"))
        # (the S3 store goes multipart above this threshold)
        with mock.patch("otaguard.server.storage.blobs_s3.MULTIPART_THRESHOLD", CHUNK):
            _unavailable(lambda: store.put_stream(_pieces(DATA[::-1], 70_000), len(DATA)))
        with pytest.raises((OSError, OtaError)):
            store.probe()
    store.probe()
    assert _get(other, NAME, CHUNK - 3, CHUNK + 3) == DATA[CHUNK - 3 : CHUNK + 4]
    assert store.read(NAME, len(DATA)) == DATA
    assert store.put(b"after") == hashlib.sha256(b"after").hexdigest()


def test_s3_connection_refused_then_back_needs_no_restart(
    s3_env: dict[str, str], tmp_path: Path
) -> None:
    """The bucket's server goes away (connection refused) and comes back on the same address:
    the same store object works again, no reconnect or restart of otaguard needed."""
    moto = MotoServer().start()
    try:
        b = _s3(moto, tmp_path)
        b.store.put_stream(_pieces(DATA, 70_000), len(DATA))
        moto.stop()
        _unavailable(lambda: b.store.open_range(NAME, 0, 9))
        _unavailable(lambda: b.node().size(NAME))
        with pytest.raises(OtaError):
            b.store.probe()
        moto.start()  # same port; moto comes back empty, as a restored bucket would be
        moto.client().create_bucket(Bucket=b.store.bucket)
        with pytest.raises(OtaError) as exc:
            b.store.open_range(NAME, 0, 9)
        assert _code(exc) == ErrorCode.NOT_FOUND
        b.store.put_stream(_pieces(DATA, 70_000), len(DATA))
        assert _get(b.store, NAME, 0, 9) == DATA[:10]
        b.store.probe()
    finally:
        moto.stop()


def test_s3_layout_and_multipart(
    s3_env: dict[str, str], moto_server: MotoServer, tmp_path: Path
) -> None:
    """Keys are ``<prefix>ab/cd/<sha256>`` like the local directory (``aws s3 sync`` of
    ``blobs/`` is a migration); a blob over the multipart threshold goes up in parts."""
    b = _s3(moto_server, tmp_path, prefix="p/")
    with mock.patch("otaguard.server.storage.blobs_s3.MULTIPART_THRESHOLD", CHUNK):
        name, _ = b.store.put_stream(_pieces(DATA, 70_000), len(DATA))
    raw = moto_server.client()
    keys = [o["Key"] for o in raw.list_objects_v2(Bucket=b.store.bucket)["Contents"]]
    assert keys == [f"p/{name[:2]}/{name[2:4]}/{name}"]
    assert b.node().read(name, len(DATA)) == DATA
    assert not list((tmp_path / "spool").iterdir())  # the spool file is gone


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(min_size=0, max_size=700),
    a=st.integers(0, 699),
    b=st.integers(0, 699),
    piece=st.integers(1, 64),
)
def test_checked_span_returns_exactly_the_range(data: bytes, a: int, b: int, piece: int) -> None:
    """Range arithmetic: for any blob, piece size and range inside it, the checked span is
    the range's bytes, read from the aligned start (property, small pieces)."""
    if not data:
        return
    start, end = sorted((a % len(data), b % len(data)))
    with mock.patch.object(blobs, "CHUNK", piece):
        d = Digests()
        for p in _pieces(data, 7):
            d.update(p)
        digest, pieces = d.finish()
        assert digest == hashlib.sha256(data).hexdigest()
        assert len(pieces) == 32 * -(-len(data) // piece)
        v = Verified(None, len(data), pieces)
        a_start, a_end = blobs.aligned(start, end, len(data))
        assert a_start % piece == 0 and a_start <= start <= end <= a_end < len(data)
        f = io.BytesIO(data)
        f.seek(a_start)
        out = b"".join(checked_span("x" * 64, v, f.read, start, end, lambda: None))
    assert out == data[start : end + 1]


def test_local_store_root_missing_is_storage_not_missing_blob(tmp_path: Path) -> None:
    store = LocalBlobStore(tmp_path / "blobs")
    name = store.put(b"x")
    shutil.rmtree(tmp_path / "blobs")
    _unavailable(lambda: store.size(name))
    _unavailable(lambda: store.read(name, 10))


def test_s3_misconfigured_bucket_is_e_storage(
    s3_env: dict[str, str], moto_server: MotoServer, tmp_path: Path
) -> None:
    """A bucket that does not exist (a typo, deleted): every operation that needs it is 503
    E_STORAGE and logged, including a multipart upload (boto3 wraps its part errors)."""
    store = S3BlobStore("otaguard-no-such-bucket", spool_dir=tmp_path, client=moto_server.client())
    _unavailable(lambda: store.put(b"x"))
    with mock.patch("otaguard.server.storage.blobs_s3.MULTIPART_THRESHOLD", CHUNK):
        _unavailable(lambda: store.put_stream(_pieces(DATA, 70_000), len(DATA)))
    _unavailable(lambda: store.open_range(NAME, 0, 9))
    _unavailable(lambda: store.read(NAME, 10))
    with pytest.raises(OtaError) as exc:
        store.probe()
    assert _code(exc) == ErrorCode.STORAGE


def test_verified_cache_expires_on_its_clock_and_keeps_to_its_byte_budget() -> None:
    now = [0.0]
    cache = blobs.VerifiedCache(reverify_after=100.0, max_bytes=1000, clock=lambda: now[0])
    cache.add("a", Verified("t", 1, b"x" * 300))
    now[0] = 99.0
    got = cache.get("a")
    assert got is not None and got.token == "t"
    now[0] = 100.0
    assert cache.get("a") is None  # hashed again from here on
    for n in "bcd":  # 3 x (300 + 128) bytes > 1000: the least recently used goes
        cache.add(n, Verified(n, 1, b"x" * 300))
    assert cache.get("b") is None and cache.get("c") is not None and cache.get("d") is not None
    cache.add("huge", Verified("h", 1, b"x" * 5000))  # over budget alone: kept, others evicted
    assert cache.get("huge") is not None and cache.get("c") is None


class NeverWrongBytes(RuleBasedStateMachine):
    """Puts, in-place damage (often within one timestamp tick, so the version token may not
    change), deletions and reads through two nodes of the local store, with 16-byte pieces.
    Whatever happens, a read returns the blob's original bytes or stops with E_NOT_FOUND
    (a range after a correct prefix), and an undamaged blob is always served."""

    def __init__(self) -> None:
        super().__init__()
        self._patch = mock.patch.object(blobs, "CHUNK", 16)
        self._patch.start()
        self._dir = Path(tempfile.mkdtemp())
        self.nodes = [LocalBlobStore(self._dir), LocalBlobStore(self._dir)]
        self.original: dict[str, bytes] = {}
        self.stored: dict[str, bytes | None] = {}

    def teardown(self) -> None:
        self._patch.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    names = Bundle("names")

    @rule(target=names, data=st.binary(min_size=1, max_size=120), node=st.integers(0, 1))
    def put(self, data: bytes, node: int) -> str:
        name = self.nodes[node].put(data)
        self.original[name] = self.stored[name] = data
        return name

    @rule(name=names, pos=st.integers(0, 119), bit=st.integers(0, 7))
    def damage(self, name: str, pos: int, bit: int) -> None:
        data = self.stored[name]
        if not data:
            return
        evil = bytearray(data)
        evil[pos % len(evil)] ^= 1 << bit
        p = self.nodes[0].path(name)
        with open(p, "r+b") as f:  # in place: same inode, same size
            f.write(evil)
        self.stored[name] = bytes(evil)

    @rule(name=names, pos=st.integers(0, 119), bit=st.integers(0, 7))
    def rot_unnoticed(self, name: str, pos: int, bit: int) -> None:
        """Damage the version token misses (bit-rot under unchanged metadata): the nodes'
        caches are made to believe the damaged file is the version they verified."""
        self.damage(name, pos, bit)
        if self.stored[name] is None:
            return
        token = blobs._token(self.nodes[0].path(name).stat())
        for n in self.nodes:
            v = n.verified.get(name)
            if v is not None:
                n.verified.add(name, Verified(token, v.size, v.pieces))

    @rule(name=names)
    def remove(self, name: str) -> None:
        if self.stored[name] is not None:
            self.nodes[0].path(name).unlink()
            self.stored[name] = None

    @rule(name=names, a=st.integers(0, 119), b=st.integers(0, 119), node=st.integers(0, 1))
    def read_range(self, name: str, a: int, b: int, node: int) -> None:
        want = self.original[name]
        start, end = sorted((a % len(want), b % len(want)))
        sent = bytearray()
        try:
            for chunk in self.nodes[node].open_range(name, start, end):
                sent += chunk
        except OtaError as err:
            assert err.code == ErrorCode.NOT_FOUND
            assert self.stored[name] != want, "an undamaged blob was refused"
        else:
            assert bytes(sent) == want[start : end + 1]
        assert bytes(sent) == want[start : start + len(sent)]  # never a wrong byte

    @rule(name=names, node=st.integers(0, 1))
    def read_whole(self, name: str, node: int) -> None:
        try:
            data = self.nodes[node].read(name, 1000)
        except OtaError as err:
            assert err.code == ErrorCode.NOT_FOUND
            assert self.stored[name] != self.original[name]
        else:
            assert data == self.original[name]


TestNeverWrongBytes = NeverWrongBytes.TestCase
TestNeverWrongBytes.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
