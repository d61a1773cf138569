"""SQLite writers of every process queue on one lock file (``<database>-writelock``): while a
write transaction is open, another process cannot take the lock, and gets it once the
transaction ends; read transactions do not take it."""

from __future__ import annotations

import fcntl
import multiprocessing as mp
import os
from pathlib import Path

from sqlalchemy import text

from otaguard.server.storage.db import Database, sqlite_url


def _try_lock(path: str, q: mp.Queue) -> None:  # type: ignore[type-arg]
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        q.put(True)
    except BlockingIOError:
        q.put(False)
    finally:
        os.close(fd)


def _other_process_gets_lock(path: Path) -> bool:
    ctx = mp.get_context("spawn")
    q: mp.Queue = ctx.Queue()  # type: ignore[type-arg]
    p = ctx.Process(target=_try_lock, args=(str(path), q))
    p.start()
    got = bool(q.get(timeout=60))
    p.join(60)
    return got


def _counter_writes(url: str, n: int) -> None:
    db = Database(url, sqlite_synchronous="NORMAL")
    for _ in range(n):
        with db.write() as conn:
            v = conn.execute(text("SELECT v FROM counter")).scalar_one()
            conn.execute(text("UPDATE counter SET v = :v"), {"v": v + 1})
    db.dispose()


def test_write_transaction_holds_the_lock_file_against_other_processes(tmp_path: Path) -> None:
    url = sqlite_url(tmp_path / "x.db")
    db = Database(url, sqlite_synchronous="NORMAL")
    lock = tmp_path / "x.db-writelock"
    with db.write() as conn:
        conn.execute(text("CREATE TABLE counter (v INTEGER)"))
        conn.execute(text("INSERT INTO counter VALUES (0)"))
        assert lock.exists()
        assert not _other_process_gets_lock(lock)
    assert _other_process_gets_lock(lock)
    with db.read() as conn:
        assert conn.execute(text("SELECT v FROM counter")).scalar_one() == 0
        assert _other_process_gets_lock(lock)  # readers never take it
    # two processes and this one's threads incrementing by read-modify-write lose nothing
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_counter_writes, args=(url, 150)) for _ in range(2)]
    for p in procs:
        p.start()
    _counter_writes(url, 150)
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    with db.read() as conn:
        assert conn.execute(text("SELECT v FROM counter")).scalar_one() == 450
    db.dispose()
