"""Secure-storage records and OTP as files on the device's persistent data partition.

A record is one file replaced atomically (temp file, fsync, rename, fsync of the directory):
after a power cut the path holds the old or the new bytes, never a mix, which is what the
flash backend gets from its two copies. Each file starts with the same header as a flash
record (:mod:`..records`): a digest, or for the boot state and the counters an HMAC under a
key derived from the hardware unique key, so a file edited by someone without the key reads
as unreadable (E_STORAGE), never as a forged value.

OTP is a file written once (``link``-based create, refused if it exists) and made read-only.
On a board without fuses or a TPM that is the best a file system can do; it is what `agent
status` calls ``storage: file`` (docs/device-linux.md, "Limits").
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import tempfile
from pathlib import Path

from ...errors import DeviceError, ErrorCode, OtaError
from ...fsutil import atomic_write
from ..records import KeySource

MAGIC = b"OGF1"
MAC_MAGIC = b"OGFM"
_HDR = struct.Struct(">4sI32s")  # magic, length, SHA-256 or HMAC-SHA256
RECORD_CAPACITY = 64 * 1024
OTP_MAGIC = b"OGFO"
OTP_CAPACITY = 4096


def _tag(magic: bytes, key: bytes | None, payload: bytes) -> bytes:
    msg = magic + struct.pack(">I", len(payload)) + payload
    if key is None:
        return hashlib.sha256(msg).digest()
    return hmac.new(key, msg, hashlib.sha256).digest()


def _write(path: Path, data: bytes, *, mode: int = 0o600, overwrite: bool = True) -> None:
    try:
        atomic_write(path, data, mode=mode, overwrite=overwrite)
    except OtaError:
        raise
    except OSError as exc:
        raise DeviceError(ErrorCode.STORAGE, f"cannot write {path}: {exc.strerror}") from None


def _read(path: Path, limit: int) -> bytes | None:
    try:
        with path.open("rb") as f:
            return f.read(limit + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DeviceError(ErrorCode.STORAGE, f"cannot read {path}: {exc.strerror}") from None


class FileRecord:
    """One record in one file (:class:`~..hal.RecordMedia`)."""

    def __init__(self, path: Path, *, key: KeySource | None = None) -> None:
        self.path = path
        self.key = key
        self.magic = MAGIC if key is None else MAC_MAGIC

    @property
    def capacity(self) -> int:
        return RECORD_CAPACITY

    def written(self) -> bool:
        return self.path.exists()

    def read(self) -> bytes | None:
        raw = _read(self.path, _HDR.size + RECORD_CAPACITY)
        if raw is None:
            return None
        key = None if self.key is None else self.key()
        if len(raw) < _HDR.size:
            return None
        magic, length, tag = _HDR.unpack(raw[: _HDR.size])
        payload = raw[_HDR.size :]
        if magic != self.magic or length != len(payload) or length > RECORD_CAPACITY:
            return None
        if not hmac.compare_digest(_tag(magic, key, payload), tag):
            return None
        return payload

    def write(self, payload: bytes) -> None:
        if len(payload) > RECORD_CAPACITY:
            raise DeviceError(
                ErrorCode.TOO_LARGE, f"{self.path.name}: {len(payload)} bytes do not fit"
            )
        key = None if self.key is None else self.key()
        head = _HDR.pack(self.magic, len(payload), _tag(self.magic, key, payload))
        _write(self.path, head + payload)


class FileOtp:
    """The write-once identity file (:class:`~..hal.OtpMedia`)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read_otp(self) -> bytes | None:
        raw = _read(self.path, _HDR.size + OTP_CAPACITY)
        if raw is None:
            return None
        if len(raw) < _HDR.size:
            raise DeviceError(ErrorCode.STORAGE, f"{self.path} is corrupt")
        magic, length, tag = _HDR.unpack(raw[: _HDR.size])
        body = raw[_HDR.size :]
        if magic != OTP_MAGIC or length != len(body) or _tag(magic, None, body) != tag:
            raise DeviceError(ErrorCode.STORAGE, f"{self.path} is corrupt")
        return body

    def program_otp(self, body: bytes) -> None:
        if len(body) > OTP_CAPACITY:
            raise DeviceError(ErrorCode.TOO_LARGE, "OTP contents too large")
        if self.path.exists():
            raise DeviceError(ErrorCode.OTP_WRITTEN, "OTP is already programmed (write-once)")
        head = _HDR.pack(OTP_MAGIC, len(body), _tag(OTP_MAGIC, None, body))
        try:
            _write(self.path, head + body, mode=0o400, overwrite=False)
        except OtaError as err:
            if err.code == ErrorCode.EXISTS:
                raise DeviceError(ErrorCode.OTP_WRITTEN, "OTP is already programmed") from None
            raise


def check_state_dir(path: Path) -> None:
    """The state directory must exist and be writable before anything is installed."""
    if not path.is_dir():
        raise DeviceError(ErrorCode.STORAGE, f"state directory {path} does not exist")
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise DeviceError(
            ErrorCode.STORAGE, f"state directory {path} is not writable: {exc.strerror}"
        ) from None
