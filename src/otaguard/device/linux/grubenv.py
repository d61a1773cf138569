"""GRUB's environment block, kept in two copies that GRUB itself reads (files/grub.cfg).

The format is GRUB's own (what ``grub-editenv`` writes): a 1024-byte block starting with
``# GRUB Environment Block``, ``NAME=value`` lines, ``#`` padding. GRUB's ``save_env``
rewrites such a file *in place* (through its block list), so this module never replaces the
files: it rewrites the same bytes of the same file and fsyncs.

Why two copies and one write per copy: every variable of one slot switch sits in the first
512-byte sector of a copy, and a copy is written as one block (a disk writes a sector whole),
so one copy is always either the old or the new decision. Copy 0 is written and synced before
copy 1; GRUB reads copy 0 unless it is not ours (no ``OG_VALID=1``), then copy 1. Either copy
alone boots a valid decision, and a copy that was lost or garbled is rewritten from the other
at the next read (:meth:`GrubEnvStore.read`).

``OG_SUM`` is a checksum over the variables only otaguard writes (sequence, order, states),
checked here on read; GRUB never loads it. GRUB only ever changes the ``OG_x_TRIES`` counters.
It is an integrity check, not authentication: the authenticated boot state (``bootstate``
record) stays the truth, and whatever GRUB starts is verified by ``agent boot-check``.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from ...errors import DeviceError, ErrorCode
from ...fsutil import fsync_dir

HEADER = b"# GRUB Environment Block\n"
BLOCK_SIZE = 1024
SECTOR = 512
SLOTS = ("A", "B")
MAX_TRIES = 9
SlotState = Literal["good", "pending", "bad"]
_STATES = ("good", "pending", "bad")
_NAME = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*")
_VALUE = re.compile(rb"[A-Za-z0-9 ._-]*")


def encode_block(variables: dict[str, str]) -> bytes:
    body = b"".join(f"{k}={v}\n".encode() for k, v in variables.items())
    for k, v in variables.items():
        if not _NAME.fullmatch(k.encode()) or not _VALUE.fullmatch(v.encode()):
            raise DeviceError(ErrorCode.BOOT_ENV, f"cannot store {k}={v!r} in a GRUB env block")
    if len(HEADER) + len(body) > SECTOR:
        raise DeviceError(ErrorCode.BOOT_ENV, "boot variables do not fit one sector")
    return HEADER + body + b"#" * (BLOCK_SIZE - len(HEADER) - len(body))


def decode_block(data: bytes) -> dict[str, str]:
    """GRUB's parse of an env block: header, ``NAME=value`` lines up to the ``#`` padding."""
    if len(data) != BLOCK_SIZE or not data.startswith(HEADER):
        raise DeviceError(ErrorCode.BOOT_ENV, "not a GRUB environment block")
    out: dict[str, str] = {}
    for line in data[len(HEADER) :].split(b"\n"):
        if not line or line.startswith(b"#"):
            continue
        name, eq, value = line.partition(b"=")
        if not eq or not _NAME.fullmatch(name) or not _VALUE.fullmatch(value):
            raise DeviceError(ErrorCode.BOOT_ENV, "malformed line in the GRUB environment")
        out[name.decode()] = value.decode()
    return out


@dataclass(frozen=True)
class BootEnv:
    """What GRUB reads: slot order, per-slot state and tries left."""

    seq: int
    order: tuple[str, str]
    states: tuple[SlotState, SlotState]
    tries: tuple[int, int]

    def _owned(self) -> str:
        return f"{self.seq};{' '.join(self.order)};{self.states[0]};{self.states[1]}"

    def checksum(self) -> str:
        return hashlib.sha256(b"otaguard-grubenv/v1;" + self._owned().encode()).hexdigest()[:16]

    def variables(self) -> dict[str, str]:
        return {
            "OG_VALID": "1",
            "OG_SEQ": str(self.seq),
            "OG_ORDER": " ".join(self.order),
            "OG_A_STATE": self.states[0],
            "OG_B_STATE": self.states[1],
            "OG_A_TRIES": str(self.tries[0]),
            "OG_B_TRIES": str(self.tries[1]),
            "OG_SUM": self.checksum(),
        }

    @classmethod
    def from_variables(cls, v: dict[str, str]) -> BootEnv:
        try:
            if v["OG_VALID"] != "1":
                raise ValueError("not valid")
            order = tuple(v["OG_ORDER"].split())
            states = (v["OG_A_STATE"], v["OG_B_STATE"])
            tries = (int(v["OG_A_TRIES"]), int(v["OG_B_TRIES"]))
            env = cls(int(v["OG_SEQ"]), (order[0], order[1]), states, tries)  # type: ignore[arg-type]
            if sorted(order) != list(SLOTS) or any(s not in _STATES for s in states):
                raise ValueError("bad order or state")
            if any(not 0 <= t <= MAX_TRIES for t in tries) or env.seq < 0:
                raise ValueError("bad counter")
            if v.get("OG_SUM") != env.checksum():
                raise ValueError("checksum")
        except (KeyError, ValueError, IndexError):
            raise DeviceError(ErrorCode.BOOT_ENV, "boot environment copy is not valid") from None
        return env

    def state(self, slot: int) -> SlotState:
        return self.states[slot]

    def with_slot(self, slot: int, state: SlotState, tries: int = 0) -> BootEnv:
        states = list(self.states)
        counts = list(self.tries)
        states[slot] = state
        counts[slot] = tries
        return replace(self, states=(states[0], states[1]), tries=(counts[0], counts[1]))

    def first(self, slot: int) -> BootEnv:
        name = SLOTS[slot]
        other = SLOTS[1 - slot]
        return replace(self, order=(name, other))


def initial_env(active: int = 0, *, other_good: bool = False) -> BootEnv:
    """A freshly provisioned device: the factory slot first and good."""
    states: list[SlotState] = ["bad", "bad"]
    states[active] = "good"
    if other_good:
        states[1 - active] = "good"
    return BootEnv(0, (SLOTS[active], SLOTS[1 - active]), (states[0], states[1]), (0, 0))


class GrubEnvStore:
    """The two env copies (paths on the ESP, or wherever grub.cfg's ``og_env_dev`` points)."""

    def __init__(self, copies: tuple[Path, Path]) -> None:
        self.copies = copies

    def _read_copy(self, path: Path) -> BootEnv | None:
        try:
            with path.open("rb") as f:
                data = f.read(BLOCK_SIZE + 1)
        except OSError:
            return None
        try:
            return BootEnv.from_variables(decode_block(data))
        except DeviceError:
            return None

    def read(self, *, repair: bool = True) -> BootEnv:
        """The newest valid copy; a lost or stale copy is rewritten from it.

        Both copies at the same sequence can differ only in the tries GRUB counted down
        (a power cut between its two ``save_env`` calls): the smaller count wins, so a cut
        never buys a slot an extra try.
        """
        envs = [self._read_copy(p) for p in self.copies]
        valid = [e for e in envs if e is not None]
        if not valid:
            raise DeviceError(ErrorCode.BOOT_ENV, "no valid copy of the boot environment")
        top = max(e.seq for e in valid)
        best = [e for e in valid if e.seq == top]
        env = best[0]
        if len(best) == 2:
            env = replace(env, tries=(min(e.tries[0] for e in best), min(e.tries[1] for e in best)))
        if repair:
            for path, copy in zip(self.copies, envs, strict=True):
                if copy != env:
                    self._write_copy(path, encode_block(env.variables()))
        return env

    def write(self, env: BootEnv) -> BootEnv:
        """Store ``env`` under the next sequence number: copy 0, sync, then copy 1."""
        try:
            seq = self.read(repair=False).seq + 1
        except DeviceError:
            seq = env.seq + 1
        new = replace(env, seq=max(seq, env.seq + 1))
        block = encode_block(new.variables())
        for path in self.copies:
            self._write_copy(path, block)
        return new

    @staticmethod
    def _write_copy(path: Path, block: bytes) -> None:
        """Rewrite the file's bytes in place (GRUB's save_env needs the same blocks)."""
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DeviceError(ErrorCode.BOOT_ENV, f"cannot open {path}: {exc.strerror}") from None
        try:
            created = os.fstat(fd).st_size == 0
            os.pwrite(fd, block, 0)
            os.fsync(fd)
        except OSError as exc:
            raise DeviceError(ErrorCode.BOOT_ENV, f"cannot write {path}: {exc.strerror}") from None
        finally:
            os.close(fd)
        if created:
            fsync_dir(path.parent)
