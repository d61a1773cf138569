"""Where an update comes from. The agent only sees these protocols, so a USB stick, the HTTPS
device client and an in-memory test source are interchangeable.

Delta updates add two optional methods (:class:`DeltaSource`): ``fetch_delta_manifest()``
offers a delta manifest *in addition to* the full one (None: no delta for this device), and
``open_patch(offset)`` streams its patch. A source whose ``fetch_manifest()`` itself returns a
delta manifest (an offline patch with no full image) needs only ``open_patch``; the agent then
has nothing to fall back to.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from ..errors import DeviceError, ErrorCode, OtaError
from ..fsutil import read_limited
from ..manifest.verify import MAX_ENVELOPE_SIZE

CHUNK = 64 * 1024


class Transport(Protocol):
    """What the update agent needs from a source of updates.

    ``open_image(offset)`` yields the image from byte ``offset`` (resume). A network drop is
    signalled by raising an OtaError with E_TRANSPORT: the agent keeps what it has and
    resumes later. A stream that simply ends early is a truncated image (E_IMAGE_SIZE).
    Implementations may expose an ``endpoint`` attribute (a URL or path) used when a source
    is recorded as suspect.
    """

    def fetch_manifest(self) -> bytes: ...

    def open_image(self, offset: int) -> Iterator[bytes]: ...

    def report(self, event: dict[str, Any]) -> None: ...


class DeltaSource(Transport, Protocol):
    """A transport that can also serve a delta: preferred by the agent, full image as fallback.

    ``fetch_delta_manifest()`` returns the signed delta manifest of the same release as
    ``fetch_manifest()`` (same version, sequence number, final digest and size), or None.
    ``open_patch(offset)`` yields the patch from byte ``offset`` (the agent resumes a dropped
    patch download in RAM); E_TRANSPORT signals a drop, as for images.
    """

    def fetch_delta_manifest(self) -> bytes | None: ...

    def open_patch(self, offset: int) -> Iterator[bytes]: ...


def from_offset(chunks: Iterable[bytes], skip: int) -> Iterator[bytes]:
    """The body of a resumed download from the requested offset: ``skip`` is that offset when
    the server ignored the ``Range`` header (200 with the whole body), 0 when it honoured it."""
    for chunk in chunks:
        if skip:
            cut = min(skip, len(chunk))
            chunk, skip = chunk[cut:], skip - cut
        if chunk:
            yield chunk


def endpoint_of(transport: object) -> str:
    ep = getattr(transport, "endpoint", None)
    return str(ep) if ep else type(transport).__name__


class LocalFileTransport:
    """Field-technician install from files (USB stick). Reports go to a JSON-lines file.

    ``manifest`` + ``image``: a full install. ``patch`` with ``delta_manifest``: the delta is
    tried first and the full image is the fallback. ``patch`` with a delta ``manifest`` and no
    image: delta only. ``bytes_read`` counts image + patch bytes handed to the agent.
    """

    def __init__(
        self,
        manifest: str | os.PathLike[str],
        image: str | os.PathLike[str] | None = None,
        *,
        patch: str | os.PathLike[str] | None = None,
        delta_manifest: str | os.PathLike[str] | None = None,
        report_log: str | os.PathLike[str] | None = None,
        chunk: int = CHUNK,
    ) -> None:
        self.manifest_path = Path(manifest)
        self.image_path = Path(image) if image is not None else None
        self.patch_path = Path(patch) if patch is not None else None
        self.delta_manifest_path = Path(delta_manifest) if delta_manifest is not None else None
        self.report_log = Path(report_log) if report_log else None
        self.chunk = chunk
        self.events: list[dict[str, Any]] = []
        self.bytes_read = 0

    @property
    def endpoint(self) -> str:
        return f"file://{self.manifest_path.resolve()}"

    def fetch_manifest(self) -> bytes:
        return self._read_manifest(self.manifest_path)

    def fetch_delta_manifest(self) -> bytes | None:
        if self.delta_manifest_path is None:
            return None
        return self._read_manifest(self.delta_manifest_path)

    @staticmethod
    def _read_manifest(path: Path) -> bytes:
        try:
            return read_limited(path, MAX_ENVELOPE_SIZE)
        except OtaError as err:
            if err.code == ErrorCode.TOO_LARGE:
                raise
            raise DeviceError(ErrorCode.TRANSPORT, f"cannot read manifest: {err.detail}") from None

    def open_image(self, offset: int) -> Iterator[bytes]:
        if self.image_path is None:
            raise DeviceError(ErrorCode.NOT_FOUND, "no full image on this source")
        return self._stream(self.image_path, offset, "image")

    def open_patch(self, offset: int) -> Iterator[bytes]:
        if self.patch_path is None:
            raise DeviceError(ErrorCode.NOT_FOUND, "no patch on this source")
        return self._stream(self.patch_path, offset, "patch")

    def _stream(self, path: Path, offset: int, what: str) -> Iterator[bytes]:
        try:
            f = path.open("rb")
        except OSError as exc:
            raise DeviceError(ErrorCode.TRANSPORT, f"cannot open {what}: {exc}") from None
        with f:
            f.seek(offset)
            while True:
                try:
                    data = f.read(self.chunk)
                except OSError as exc:
                    raise DeviceError(ErrorCode.TRANSPORT, f"{what} read failed: {exc}") from None
                if not data:
                    return
                self.bytes_read += len(data)
                yield data

    def report(self, event: dict[str, Any]) -> None:
        import json

        self.events.append(event)
        if self.report_log is not None:
            with self.report_log.open("a") as f:
                f.write(json.dumps(event, sort_keys=True) + "\n")
