"""A simulated clock shared across processes (the simulator and its server processes).

The fleet simulator runs the update server in processes of its own (their own GILs)
and the devices in the simulator's process; both must read the same simulated time. The
clock lives in a 24-byte named shared-memory block: a sequence number, the current time and
the monotonic origin. There is exactly one writer (the simulator, which owns the block); any
number of processes attach by name and read. Reads use a sequence lock: the writer makes the
sequence odd, writes, makes it even again; a reader retries until it saw the same even
sequence before and after reading, so it never observes a half-written value.

It implements the :class:`~otaguard.clock.Clock` protocol (``now``/``monotonic``) plus
``advance``/``set`` like :class:`~otaguard.clock.SimClock`, so it is a drop-in for it.
"""

from __future__ import annotations

import contextlib
import struct
import threading
from multiprocessing import resource_tracker, shared_memory

_FMT = "<Qdd"  # seq, t, origin
_SIZE = struct.calcsize(_FMT)
_OWNED: set[str] = set()  # blocks created by this process


class SharedClock:
    def __init__(self, shm: shared_memory.SharedMemory, *, owner: bool) -> None:
        self._shm = shm
        assert shm.buf is not None
        self._buf: memoryview = shm.buf
        self._owner = owner
        self._lock = threading.Lock()  # serialises writers within the owning process
        self._final: tuple[float, float] | None = None  # the time when closed (read-only)

    @classmethod
    def create(cls, start: float) -> SharedClock:
        shm = shared_memory.SharedMemory(create=True, size=_SIZE)
        clk = cls(shm, owner=True)
        _OWNED.add(shm.name)
        struct.pack_into(_FMT, clk._buf, 0, 0, float(start), float(start))
        return clk

    @classmethod
    def attach(cls, name: str, *, creators_tracker: bool = False) -> SharedClock:
        """Attach to the block ``name``. ``creators_tracker``: this process is a
        multiprocessing child sharing the creator's resource tracker, whose one registration
        of the block must stay until the creator unlinks it."""
        shm = shared_memory.SharedMemory(name=name)
        # The owner unlinks the block; an attaching process must not have the resource
        # tracker unlink it again (or warn about a "leak") when it exits.
        if shm.name in _OWNED or creators_tracker:  # one registration: the creator's
            return cls(shm, owner=False)
        with contextlib.suppress(AttributeError, KeyError, ValueError):
            resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        return cls(shm, owner=False)

    @property
    def name(self) -> str:
        return self._shm.name

    def _read(self) -> tuple[float, float]:
        if self._final is not None:
            return self._final
        buf = self._buf
        while True:
            s1, t, origin = struct.unpack_from(_FMT, buf, 0)
            if s1 & 1:
                continue  # a write is in progress
            s2 = struct.unpack_from("<Q", buf, 0)[0]
            if s1 == s2:
                return t, origin

    def now(self) -> float:
        return self._read()[0]

    def monotonic(self) -> float:
        t, origin = self._read()
        return t - origin

    def _write(self, t: float) -> None:
        if not self._owner or self._final is not None:
            raise PermissionError("only the process that created the shared clock sets it")
        buf = self._buf
        seq = struct.unpack_from("<Q", buf, 0)[0]
        struct.pack_into("<Q", buf, 0, seq + 1)
        struct.pack_into("<d", buf, 8, t)
        struct.pack_into("<Q", buf, 0, seq + 2)

    def advance(self, seconds: float) -> float:
        if seconds < 0:
            raise ValueError("a simulated clock cannot go backwards")
        with self._lock:
            t = self.now() + seconds
            self._write(t)
            return t

    def set(self, t: float) -> None:
        with self._lock:
            if t < self.now():
                raise ValueError("a simulated clock cannot go backwards")
            self._write(float(t))

    def close(self) -> None:
        """Detach (the clock then keeps reading its last time); the owner also removes the
        block."""
        if self._final is not None:
            return
        self._final = self._read()
        self._buf.release()
        self._shm.close()
        if self._owner:
            _OWNED.discard(self._shm.name)
            with contextlib.suppress(FileNotFoundError):
                self._shm.unlink()
