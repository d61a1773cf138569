"""Several processes per node: ``server run --workers N`` serves the device listener from N
processes on one listening socket.

Why: one Python process answers check-ins from one thread, and on PostgreSQL its event loop
waits through every database round trip, so one process cannot keep two cores busy
(docs/benchmarks.md). More processes overlap those waits and use every core.

What is shared, and how: everything a device request decides on is in the database already
(device rows, assignments, campaigns, key lists through ``trustsync``, per-device limits and
probe counters through ``sharedlimits``), so N processes on one PostgreSQL behave as N nodes
do. That is also why ``--workers`` above 1 needs PostgreSQL: on SQLite each process would
count its own per-device limit. The TUF repository's files are shared through a lock file
(``storage/tufrepo.py``). The admin listener and the dashboard stay in the first process: the
rotation audit log has one writer per node, and ``/metrics`` there adds the workers' counters,
which each worker sends every second (:class:`PeerMetrics`).

The workers are forked before the first process loads a key, opens the database or starts a
thread (PKCS#11 sessions, connections and threads do not survive ``fork``), and build their
own server once the first process has built its own (the migrations, and the TUF online keys
generated at first start, then exist once). A worker that exits stops the node: the service
manager restarts it, and the balancer's health check routes around it meanwhile, which is
simpler to reason about than a node that runs on with fewer processes than configured.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, Pipe, wait
from typing import Any

from prometheus_client.core import Metric

log = logging.getLogger("otaguard.server")
PUBLISH_EVERY = 1.0  # seconds between a worker's counter snapshots
_PR_SET_PDEATHSIG = 1

# A counter snapshot: family name -> (samples: (sample name, sorted label items, value)).
Snapshot = dict[str, list[tuple[str, tuple[tuple[str, str], ...], float]]]


@dataclass
class DeviceWorker:
    """The first process's handle on a forked device worker."""

    index: int
    pid: int
    metrics: Connection  # the worker's counter snapshots
    go: int  # write end: one byte when the worker may build its server
    exit_status: int | None = None


def fork_device_workers(count: int, serve: Callable[[int, Connection], None]) -> list[DeviceWorker]:
    """Fork ``count`` workers; each waits for :func:`release`, then runs ``serve(index,
    metrics_sender)`` and exits with its status. Call before anything opens a connection,
    a key or a thread."""
    workers: list[DeviceWorker] = []
    parent = os.getpid()
    for index in range(1, count + 1):
        reader, sender = Pipe(duplex=False)
        go_r, go_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the worker
            status = 1
            try:
                _die_with(parent)
                reader.close()
                os.close(go_w)
                for w in workers:  # the first process's ends of earlier workers
                    w.metrics.close()
                    os.close(w.go)
                if os.read(go_r, 1) == b"g":
                    serve(index, sender)
                status = 0
            except SystemExit as exc:
                status = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                log.exception("device worker %d failed", index)
            finally:
                os._exit(status)
        sender.close()
        os.close(go_r)
        workers.append(DeviceWorker(index, pid, reader, go_w))
    return workers


def _die_with(parent: int) -> None:
    """SIGTERM this worker when the first process dies (Linux), whatever killed it; and out
    of the terminal's process group, so a Ctrl-C reaches the first process only, which then
    stops its workers (a worker exiting on its own means a failure)."""
    with contextlib.suppress(OSError):
        os.setpgid(0, 0)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # died before prctl took effect
        os._exit(1)


def release(workers: Iterable[DeviceWorker]) -> None:
    """Let the workers build their servers (the first process has built its own)."""
    for w in workers:
        with contextlib.suppress(OSError):
            os.write(w.go, b"g")
        os.close(w.go)


def reap(workers: Iterable[DeviceWorker]) -> DeviceWorker | None:
    """The first worker found to have exited since the last call, if any (no waiting)."""
    for w in workers:
        if w.exit_status is not None:
            continue
        with contextlib.suppress(ChildProcessError):
            pid, status = os.waitpid(w.pid, os.WNOHANG)
            if pid == 0:
                continue
            w.exit_status = os.waitstatus_to_exitcode(status)
            return w
    return None


def stop(workers: Iterable[DeviceWorker], timeout: float = 10.0) -> None:
    """SIGTERM every worker still running, then SIGKILL what has not exited in ``timeout``."""
    alive = [w for w in workers if w.exit_status is None]
    for w in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(w.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while alive and time.monotonic() < deadline:
        while reap(alive) is not None:
            pass
        alive = [w for w in alive if w.exit_status is None]
        if alive:
            time.sleep(0.05)
    for w in alive:
        with contextlib.suppress(ProcessLookupError):
            os.kill(w.pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(w.pid, 0)
            w.exit_status = -signal.SIGKILL


# --- counters ------------------------------------------------------------------------------------
def snapshot(families: Iterable[Metric]) -> Snapshot:
    """What a worker sends: its counter and histogram samples (``_created`` left out: a
    creation time is not a count)."""
    out: Snapshot = {}
    for fam in families:
        out[fam.name] = [
            (s.name, tuple(sorted(s.labels.items())), float(s.value))
            for s in fam.samples
            if not s.name.endswith("_created")
        ]
    return out


async def publish(families: Callable[[], Iterable[Metric]], sender: Connection) -> None:
    """A worker's loop: its counters to the first process every :data:`PUBLISH_EVERY`."""
    import asyncio

    loop = asyncio.get_running_loop()
    while True:
        try:
            # On a thread: a first process that stopped reading (stopped, swapped out) fills
            # the pipe, and a blocking send must not stop this worker's event loop with it.
            await loop.run_in_executor(None, sender.send, snapshot(families()))
        except (OSError, ValueError):
            return  # the first process is gone: its death signal stops us
        await asyncio.sleep(PUBLISH_EVERY)


@dataclass
class PeerMetrics:
    """The first process's view of its workers' counters: the newest snapshot of each,
    received on a thread; :meth:`merged` adds them to this process's own families."""

    latest: dict[int, Snapshot] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def follow(self, workers: list[DeviceWorker]) -> None:
        conns = {w.metrics: w.index for w in workers}

        def loop() -> None:
            while conns:
                for conn in wait(list(conns), timeout=1.0):
                    assert isinstance(conn, Connection)
                    try:
                        snap = conn.recv()
                    except (EOFError, OSError):
                        del conns[conn]  # the worker exited: the node is stopping
                        continue
                    with self._lock:
                        self.latest[conns[conn]] = snap

        threading.Thread(target=loop, name="otaguard-peer-metrics", daemon=True).start()

    def merged(self, own: Iterable[Metric]) -> Iterator[Metric]:
        """``own`` families with every worker's samples of the same family added (by sample
        name and labels; a series only a worker has is added too)."""
        with self._lock:
            peers = list(self.latest.values())
        for fam in own:
            extra = [s for p in peers for s in p.get(fam.name, ())]
            if not extra:
                yield fam
                continue
            totals: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
            for s in fam.samples:
                totals[(s.name, tuple(sorted(s.labels.items())))] = float(s.value)
            for name, labels, value in extra:
                key = (name, labels)
                totals[key] = totals.get(key, 0.0) + value
            out = Metric(fam.name, fam.documentation, fam.type, fam.unit)
            for (name, labels), value in totals.items():
                out.add_sample(name, dict(labels), value)
            yield out


def collect_only(collectors: Iterable[Any]) -> Callable[[], list[Metric]]:
    """The families of ``collectors`` (a worker's own counters, not the database gauges)."""
    items = list(collectors)
    return lambda: [fam for c in items for fam in c.collect()]
