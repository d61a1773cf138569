"""The blob store in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW) through boto3.

Same names, same layout (``<prefix>ab/cd/abcd…``) and same errors as the local store
(:mod:`.blobs`), so several server nodes share one bucket and any of them serves any range of
any blob: the ETag devices resume with (``If-Range``) is the blob's digest, not the object's.

* **Writes** spool the body to a local temp file while hashing it (bounded memory, the name is
  known before anything reaches the bucket), then upload it under its final key: a single PUT
  below 64 MiB, a multipart upload above (8 MiB parts, two at a time), and S3 makes an object
  visible only once complete, so a crash never leaves a partial blob under a name. Putting an
  existing name again writes it again: same name, same bytes, and a repair if it was damaged.
* **Reads** verify (see :class:`~.blobs.VerifiedCache`): the first read of a blob through this
  node streams the whole object and hashes it; its ETag is kept, and every ranged read after
  that is a ``GetObject(Range=…, IfMatch=etag)``, so an object replaced since is refused by the
  bucket itself (412) and hashed again. A mismatch is logged and answered as a missing blob.
* **Faults**: connection refused, timeouts (``connect_timeout``, ``read_timeout``, one retry)
  and 5xx answers become 503 ``E_STORAGE``; the boto3 client holds no state that outlives a
  request, so the first request after the store comes back succeeds. Credentials come from
  boto3's own chain (environment, profile, instance role), never from otaguard's options.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import anyio.to_thread
import boto3
from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from ...errors import ErrorCode, OtaError
from .blobs import (
    CHUNK,
    Digests,
    Spool,
    Verified,
    VerifiedCache,
    aligned,
    blob_key,
    checked_size,
    checked_span,
    missing,
    unavailable,
)

MULTIPART_THRESHOLD = 64 * 1024 * 1024
PART_SIZE = 8 * 1024 * 1024  # 10,000 parts: blobs up to 78 GiB
_MISSING = {"NoSuchKey", "404", "NotFound"}


class _Missing(Exception):
    pass


class _Changed(Exception):
    """If-Match failed: the object is not the version this node verified."""


def s3_client(
    endpoint_url: str | None,
    region: str | None,
    *,
    connect_timeout: float = 3.0,
    read_timeout: float = 10.0,
    attempts: int = 2,
) -> Any:
    """A boto3 S3 client with small, bounded timeouts (a device waits on every call).

    Path-style addressing for a custom endpoint (MinIO and Ceph are seldom set up for
    virtual-host buckets); checksums only where S3 requires them, since newer boto3 adds CRC
    trailers some S3-compatible stores refuse, and the blob's SHA-256 is checked anyway."""
    extra: dict[str, Any] = {}
    if endpoint_url:
        extra["s3"] = {"addressing_style": "path"}
    cfg = Config(
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
        retries={"max_attempts": attempts, "mode": "standard"},
        max_pool_connections=32,
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
        **extra,
    )
    session = boto3.session.Session()
    return session.client("s3", endpoint_url=endpoint_url, region_name=region, config=cfg)


class S3BlobStore:
    def __init__(
        self,
        bucket: str,
        *,
        spool_dir: Path,
        prefix: str = "",
        client: Any = None,
        endpoint_url: str | None = None,
        region: str | None = None,
        verified: VerifiedCache | None = None,
    ) -> None:
        """``spool_dir``: a local directory for uploads in progress (one temp file each).
        Nothing is asked of the bucket here: a server starts while its store is down."""
        self.bucket = bucket
        self.prefix = prefix
        self.client = client if client is not None else s3_client(endpoint_url, region)
        self.spool_dir = Path(spool_dir)
        self.spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.verified = verified or VerifiedCache()
        self._probe_key = f"{prefix}health/{uuid.uuid4().hex}"

    def key(self, name: str) -> str:
        return self.prefix + blob_key(name)

    def _call(self, what: str, fn: Callable[..., Any], **kw: Any) -> Any:
        try:
            return fn(Bucket=self.bucket, **kw)
        except ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if code in _MISSING:
                raise _Missing from None
            if code == "PreconditionFailed" or status == 412:
                raise _Changed from None
            # 5xx, throttling, and also 403 / NoSuchBucket: the store is unusable as
            # configured; the operator fixes it and the next request works.
            raise unavailable(what, f"{code} {status}: {err.get('Message', '')}") from None
        except (BotoCoreError, Boto3Error, OSError) as exc:
            # Boto3Error: upload_file's S3UploadFailedError (a part failed; the multipart
            # upload is aborted by the transfer manager)
            raise unavailable(what, exc) from None

    # --- writes --------------------------------------------------------------------------------
    def put(self, data: bytes) -> str:
        name, _ = self.put_stream([data], len(data))
        return name

    def put_stream(self, chunks: Iterable[bytes], max_size: int) -> tuple[str, int]:
        try:
            spool = Spool(self.spool_dir, max_size)
            try:
                for chunk in chunks:
                    spool.write(chunk)
                name, pieces = spool.finish()
                self._upload(spool.tmp, name, spool.total, pieces)
                return name, spool.total
            finally:
                spool.discard()
        except OSError as exc:  # the local spool: full, read-only, gone
            raise unavailable("spool", exc) from None

    async def put_async(self, chunks: AsyncIterator[bytes], max_size: int) -> tuple[str, int]:
        try:
            spool = Spool(self.spool_dir, max_size)
            try:
                async for chunk in chunks:
                    spool.write(chunk)
                name, pieces = spool.finish()
                await anyio.to_thread.run_sync(self._upload, spool.tmp, name, spool.total, pieces)
                return name, spool.total
            finally:
                spool.discard()
        except OSError as exc:
            raise unavailable("spool", exc) from None

    def _upload(self, path: str, name: str, size: int, pieces: bytes) -> None:
        """Always written, also over an existing object: putting a blob again is the repair
        of a damaged one, even one no check has noticed yet."""
        key = self.key(name)
        try:
            if size < MULTIPART_THRESHOLD:
                with open(path, "rb") as f:
                    resp = self._call("put", self.client.put_object, Key=key, Body=f)
                etag = resp["ETag"]
            else:
                cfg = TransferConfig(
                    multipart_threshold=MULTIPART_THRESHOLD,
                    multipart_chunksize=PART_SIZE,
                    max_concurrency=2,
                )
                self._call("upload", self.client.upload_file, Filename=path, Key=key, Config=cfg)
                head = self._head(name)
                if head is None:
                    raise unavailable("upload", f"{key} not there after upload")
                etag = head[0]
        except (_Missing, _Changed) as exc:
            raise unavailable("upload", repr(exc)) from None
        self.verified.add(name, Verified(etag, size, pieces))

    def _head(self, name: str) -> tuple[str, int] | None:
        try:
            r = self._call("head", self.client.head_object, Key=self.key(name))
        except _Missing:
            return None
        return str(r["ETag"]), int(r["ContentLength"])

    # --- reads ---------------------------------------------------------------------------------
    def size(self, name: str) -> int | None:
        known = self.verified.get(name)
        if known is not None:
            return known.size  # content-addressed: a verified name's size cannot change
        head = self._head(name)
        return None if head is None else checked_size(name, head[1])

    def read(self, name: str, max_size: int) -> bytes:
        """The whole blob (manifests: small), hashed on every read."""
        try:
            r = self._call("get", self.client.get_object, Key=self.key(name))
        except _Missing:
            raise missing(name, "not in the bucket") from None
        except _Changed:  # pragma: no cover - no If-Match sent
            raise unavailable("get", "unexpected 412") from None
        body = r["Body"]
        try:
            if int(r["ContentLength"]) > max_size:
                raise OtaError(ErrorCode.TOO_LARGE, f"blob {name} is over {max_size} bytes")
            data = self._body(body.read)(max_size + 1)
        finally:
            body.close()
        if hashlib.sha256(data).hexdigest() != name:
            raise missing(name, "its bytes no longer match its SHA-256 name")
        return data

    def _body(self, read: Callable[[int], bytes]) -> Callable[[int], bytes]:
        def guarded(n: int) -> bytes:
            try:
                return read(n)
            except (BotoCoreError, OSError) as exc:
                raise unavailable("body", exc) from None

        return guarded

    def open_range(self, name: str, start: int, end: int) -> Iterator[bytes]:
        """Bytes ``start`` .. ``end`` inclusive, in chunks, of the object version this node
        verified (``If-Match``), each piece checked against its digest before it is sent."""
        for _ in range(2):
            v = self.verified.get(name) or self._verify_now(name)
            a_start, a_end = aligned(start, end, v.size)
            try:
                r = self._call(
                    "get",
                    self.client.get_object,
                    Key=self.key(name),
                    Range=f"bytes={a_start}-{a_end}",
                    IfMatch=v.token,
                )
            except _Missing:
                self.verified.drop(name)
                raise missing(name, "not in the bucket") from None
            except _Changed:
                self.verified.drop(name)  # replaced since it was verified: hash it again
                continue
            return self._stream(name, v, r["Body"], start, end)
        raise unavailable("get", f"{self.key(name)} keeps changing")

    def _stream(self, name: str, v: Verified, body: Any, start: int, end: int) -> Iterator[bytes]:
        try:
            read = self._body(body.read)
            yield from checked_span(name, v, read, start, end, lambda: self.verified.drop(name))
        finally:
            body.close()

    def _verify_now(self, name: str) -> Verified:
        with self.verified.lock(name):
            known = self.verified.get(name)
            if known is not None:  # another request verified it while this one waited
                return known
            try:
                r = self._call("get", self.client.get_object, Key=self.key(name))
            except _Missing:
                raise missing(name, "not in the bucket") from None
            except _Changed:  # pragma: no cover - no If-Match sent
                raise unavailable("get", "unexpected 412") from None
            etag = str(r["ETag"])
            d = Digests()
            body = r["Body"]
            read = self._body(body.read)
            try:
                while chunk := read(CHUNK):
                    d.update(chunk)
            finally:
                body.close()
            digest, pieces = d.finish()
            if digest != name:
                raise missing(name, f"object (ETag {etag}) no longer matches its SHA-256 name")
            v = Verified(etag, d.size, pieces)
            self.verified.add(name, v)
            return v

    def verify(self, name: str) -> bool:
        """Re-hash the stored object (a scrub), ignoring what this node verified before."""
        self.verified.drop(name)
        try:
            self._verify_now(name)
        except OtaError as err:
            if err.code == ErrorCode.NOT_FOUND:
                return False
            raise
        return True

    def probe(self) -> None:
        """Put, read back and delete a small object of this node's (the health check)."""
        try:
            self._call("probe", self.client.put_object, Key=self._probe_key, Body=b"ok")
            r = self._call("probe", self.client.get_object, Key=self._probe_key)
            data = self._body(r["Body"].read)(3)
            self._call("probe", self.client.delete_object, Key=self._probe_key)
        except (_Missing, _Changed) as exc:
            raise OSError(f"blob store probe: {exc!r}") from None
        if data != b"ok":
            raise OSError("blob store probe read back different bytes")
