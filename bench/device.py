"""Device benchmarks: streaming hash vs hashlib, install memory vs image size, install time.

    .venv/bin/python bench/device.py            # full run (256 MiB install, ~1 min)
    .venv/bin/python bench/device.py --big-mib 32   # quicker

Targets (issue 4): streaming hash >= 90% of hashlib on the same buffer; peak traced memory
installing a 256 MiB image within 8 MiB of installing a 1 MiB image.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import tempfile
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from otaguard.crypto.algorithms import HashAlg, StreamingHasher
from otaguard.device.device import Device
from otaguard.device.lab import Lab, image_bytes
from otaguard.device.layout import LayoutConfig

MIB = 1024 * 1024
BLOCK = 64 * 1024


class GeneratedTransport:
    """An image that exists only as a generator: nothing image-sized is ever in RAM."""

    def __init__(self, manifest: bytes, size: int, seed: int) -> None:
        self.manifest = manifest
        self.size = size
        self.block = image_bytes(BLOCK, seed)

    def fetch_manifest(self) -> bytes:
        return self.manifest

    def open_image(self, offset: int) -> Iterator[bytes]:
        assert offset % BLOCK == 0
        for pos in range(offset, self.size, BLOCK):
            # vary each block so the digest covers position too
            yield pos.to_bytes(8, "big") + self.block[8 : min(BLOCK, self.size - pos)]

    def report(self, event: dict[str, Any]) -> None:
        pass

    def digest(self) -> bytes:
        h = hashlib.sha256()
        for chunk in self.open_image(0):
            h.update(chunk)
        return h.digest()


def bench_hash(total_mib: int = 256) -> tuple[float, float]:
    buf = image_bytes(BLOCK, 7) * (total_mib * MIB // BLOCK)
    best_ref = best_ours = 0.0
    for _ in range(3):
        t = time.perf_counter()
        ref = hashlib.sha256(buf).digest()
        best_ref = max(best_ref, total_mib / (time.perf_counter() - t))
        view = memoryview(buf)
        t = time.perf_counter()
        h = StreamingHasher(HashAlg.SHA256)
        for off in range(0, len(buf), BLOCK):
            h.update(view[off : off + BLOCK])
        ours = h.digest()
        best_ours = max(best_ours, total_mib / (time.perf_counter() - t))
        assert ours == ref
    return best_ref, best_ours


def provisioned(lab: Lab, root: Path, name: str, cfg: LayoutConfig) -> Path:
    d = root / name
    lab.provision(d, image_bytes(4096, 0), cfg=cfg).close()
    return d


def install(lab: Lab, d: Path, size: int, seed: int, *, trace: bool) -> tuple[float, int]:
    t = GeneratedTransport(b"", size, seed)
    t.manifest = lab.release((t.digest(), size), version="2.0.0", seq=2, counter=1)
    with Device(d, clock=lambda: lab.now, checkpoint=4 * MIB) as dev:
        if trace:
            tracemalloc.start()
            tracemalloc.reset_peak()
        start = time.perf_counter()
        dev.install(t)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1] if trace else 0
        if trace:
            tracemalloc.stop()
    with Device(d, clock=lambda: lab.now) as dev:
        assert dev.boot().mode == "test"
    return elapsed, peak


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--big-mib", type=int, default=256)
    ap.add_argument("--hash-mib", type=int, default=256)
    args = ap.parse_args()
    logging.getLogger("otaguard.keys").setLevel(logging.ERROR)
    lab = Lab()
    rows: list[tuple[str, str, str, str]] = []

    ref, ours = bench_hash(args.hash_mib)
    rows.append(
        (
            f"SHA-256 of {args.hash_mib} MiB: StreamingHasher (64 KiB chunks) vs hashlib one-shot",
            f"{ours:.0f} vs {ref:.0f} MiB/s",
            f"{ours / ref:.1%}",
            ">= 90%",
        )
    )

    with tempfile.TemporaryDirectory(prefix="otaguard-bench-") as tmp:
        root = Path(tmp)
        big = LayoutConfig(
            sector_size=64 * 1024,
            page_size=4096,
            slot_size=(args.big_mib + 1) * MIB,
            manifest_size=64 * 1024,
            bootloader_size=64 * 1024,
        )
        _, peak_small = install(lab, provisioned(lab, root, "small", big), MIB, 1, trace=True)
        t_big, peak_big = install(
            lab, provisioned(lab, root, "big", big), args.big_mib * MIB, 2, trace=True
        )
        delta = (peak_big - peak_small) / MIB
        rows.append(
            (
                f"peak traced memory, install {args.big_mib} MiB vs 1 MiB image",
                f"{peak_big / MIB:.2f} vs {peak_small / MIB:.2f} MiB",
                f"{delta:+.2f} MiB",
                "<= 8 MiB apart",
            )
        )
        rows.append(
            (
                f"install {args.big_mib} MiB (64 KiB sectors, 4 KiB pages, traced)",
                f"{t_big:.1f} s",
                f"{args.big_mib / t_big:.1f} MiB/s",
                "-",
            )
        )
        small_geo = LayoutConfig(slot_size=5 * MIB, manifest_size=8192)
        d4 = provisioned(lab, root, "four", small_geo)
        t4, _ = install(lab, d4, 4 * MIB, 3, trace=False)
        ops = 4 * MIB // 256 + 4 * MIB // 4096
        rows.append(
            (
                "install 4 MiB (4 KiB sectors, 256 B pages: ~17.4k flash ops + read-back)",
                f"{t4:.2f} s",
                f"{4 / t4:.1f} MiB/s, {ops / t4 / 1000:.0f}k ops/s",
                "-",
            )
        )

    w = max(len(r[0]) for r in rows)
    print(f"{'measurement':<{w}}  {'value':<26}  {'ratio':<22}  target")
    for r in rows:
        print(f"{r[0]:<{w}}  {r[1]:<26}  {r[2]:<22}  {r[3]}")


if __name__ == "__main__":
    main()
