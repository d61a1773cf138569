"""Where an update comes from. The agent only sees this protocol, so a USB stick, the HTTPS
device client and (later) a delta source are interchangeable.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
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


def endpoint_of(transport: object) -> str:
    ep = getattr(transport, "endpoint", None)
    return str(ep) if ep else type(transport).__name__


class LocalFileTransport:
    """Field-technician install from files (USB stick). Reports go to a JSON-lines file."""

    def __init__(
        self,
        manifest: str | os.PathLike[str],
        image: str | os.PathLike[str],
        *,
        report_log: str | os.PathLike[str] | None = None,
        chunk: int = CHUNK,
    ) -> None:
        self.manifest_path = Path(manifest)
        self.image_path = Path(image)
        self.report_log = Path(report_log) if report_log else None
        self.chunk = chunk
        self.events: list[dict[str, Any]] = []

    @property
    def endpoint(self) -> str:
        return f"file://{self.manifest_path.resolve()}"

    def fetch_manifest(self) -> bytes:
        try:
            return read_limited(self.manifest_path, MAX_ENVELOPE_SIZE)
        except OtaError as err:
            if err.code == ErrorCode.TOO_LARGE:
                raise
            raise DeviceError(ErrorCode.TRANSPORT, f"cannot read manifest: {err.detail}") from None

    def open_image(self, offset: int) -> Iterator[bytes]:
        try:
            f = self.image_path.open("rb")
        except OSError as exc:
            raise DeviceError(ErrorCode.TRANSPORT, f"cannot open image: {exc}") from None
        with f:
            f.seek(offset)
            while True:
                try:
                    data = f.read(self.chunk)
                except OSError as exc:
                    raise DeviceError(ErrorCode.TRANSPORT, f"image read failed: {exc}") from None
                if not data:
                    return
                yield data

    def report(self, event: dict[str, Any]) -> None:
        import json

        self.events.append(event)
        if self.report_log is not None:
            with self.report_log.open("a") as f:
                f.write(json.dumps(event, sort_keys=True) + "\n")
