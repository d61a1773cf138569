"""Blob store throughput: what the read verification costs, locally and against an
S3-compatible server (moto's standalone server, a subprocess on 127.0.0.1).

    .venv/bin/python bench/blobs.py                 # 64 MiB blob
    .venv/bin/python bench/blobs.py --size 256 --no-s3

Rows: a plain read of the file (the serving path before read verification), a range served
by a node that has verified the blob (every 256 KiB piece hashed and compared before it is
sent), the first read on a node (the whole blob hashed, then served), and the upload. Best of
three runs; MiB/s of blob bytes. The peak RSS column is the process's after that row (the blob
is generated in 1 MiB pieces, never held whole): it shows memory stays flat in the blob size.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from otaguard.server.storage.blobs import CHUNK, LocalBlobStore

MIB = 1024 * 1024


def pieces(size: int) -> Iterator[bytes]:
    block = os.urandom(MIB)
    for i in range(size // MIB):
        yield block[i % 97 :] + block[: i % 97]


def best(fn: Callable[[], object], runs: int = 3) -> float:
    out = 1e9
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        out = min(out, time.perf_counter() - t)
    return out


def drain(it: Iterator[bytes]) -> None:
    for _ in it:
        pass


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rows(kind: str, store: Any, size: int, raw: Callable[[str], object] | None) -> list[str]:
    out = []
    t = best(lambda: store.put_stream(pieces(size), size), 1)
    name, _ = store.put_stream(pieces(size), size)
    out.append(f"| {kind} | upload (put_stream) | {size / MIB / t:,.0f} | {rss_mib():,.0f} |")
    if raw is not None:
        t = best(lambda: raw(name))
        out.append(f"| {kind} | plain read, unchecked | {size / MIB / t:,.0f} | {rss_mib():,.0f} |")
    t = best(lambda: drain(store.open_range(name, 0, size - 1)))
    out.append(
        f"| {kind} | range served, verified node | {size / MIB / t:,.0f} | {rss_mib():,.0f} |"
    )

    def first() -> None:
        store.verified.drop(name)
        drain(store.open_range(name, 0, size - 1))

    t = best(first)
    out.append(f"| {kind} | first read on a node | {size / MIB / t:,.0f} | {rss_mib():,.0f} |")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64, help="MiB")
    ap.add_argument("--no-s3", action="store_true")
    args = ap.parse_args()
    size = args.size * MIB
    print(f"blob {args.size} MiB, pieces of {CHUNK // 1024} KiB, best of 3\n")
    print("| store | operation | MiB/s | peak RSS MiB |\n|---|---|---|---|")
    with tempfile.TemporaryDirectory() as d:
        local = LocalBlobStore(Path(d) / "blobs")

        def raw(name: str) -> None:
            with local.path(name).open("rb") as f:
                while f.read(CHUNK):
                    pass

        for r in rows("local", local, size, raw):
            print(r, flush=True)
        if args.no_s3:
            return
        from tests.s3server import S3_ENV, MotoServer

        os.environ.update(S3_ENV)
        moto = MotoServer().start()
        try:
            from otaguard.server.storage.blobs_s3 import S3BlobStore

            s3 = S3BlobStore(moto.new_bucket(), spool_dir=Path(d) / "spool", client=moto.client())
            for r in rows("S3 (moto, 127.0.0.1)", s3, size, None):
                print(r, flush=True)
        finally:
            moto.stop()


if __name__ == "__main__":
    main()
