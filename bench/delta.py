"""Delta benchmark: otaguard vs bsdiff4, xdelta3, zstd --patch-from and detools on real firmware.

usage: .venv/bin/python bench/delta.py [--quick] [--pairs NAME ...] [--corpus DIR]

Fetches/caches the corpus through scripts/corpus.sh (pinned package versions + SHA-256), then for
every pair prints patch size as % of the new image and as % of the `xz -9e` compressed image,
create/apply time, and otaguard's peak apply heap (tracemalloc), and whether otaguard meets the
issue's targets (size <= 1.05 x best peer, peak heap < 2 MiB). Every patch is applied and its
output compared with the new image; a tool whose output differs is reported as FAILED.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from otaguard.delta import apply_patch, create_patch, patch_header  # noqa: E402

QUICK = ("microbit-upy-1.0.0-1.0.1", "pybv11-upy-1.10-1f5d945af")
MEM_LIMIT = 2 * 1024 * 1024
SIZE_SLACK = 1.05


@dataclass
class Row:
    tool: str
    size: int
    create_s: float
    apply_s: float
    ok: bool
    note: str = ""


def timed(fn: Callable[[], object]) -> tuple[object, float]:
    t = time.perf_counter()
    r = fn()
    return r, time.perf_counter() - t


def run(*cmd: str | Path) -> None:
    subprocess.run([str(c) for c in cmd], check=True, capture_output=True)


def bench_otaguard(old_p: Path, new_p: Path, tmp: Path) -> tuple[Row, int, str]:
    old, new = old_p.read_bytes(), new_p.read_bytes()
    patch, tc = timed(lambda: create_patch(old, new))
    assert isinstance(patch, bytes)
    (tmp / "og.patch").write_bytes(patch)
    head = patch_header(patch)
    streams = "/".join(f"{s.comp_size}" for s in head.streams)
    new_sha = hashlib.sha256(new).digest()
    out_p = tmp / "og.out"
    old_size = len(old)

    with open(old_p, "rb") as fo, open(tmp / "og.patch", "rb") as fp, open(out_p, "wb") as fw:

        def read_old(off: int, n: int) -> bytes:
            fo.seek(off)
            return fo.read(n)

        tracemalloc.start()
        t = time.perf_counter()
        apply_patch(fp, read_old, fw.write, old_size=old_size, max_new=1 << 32)
        ta = time.perf_counter() - t
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    ok = hashlib.sha256(out_p.read_bytes()).digest() == new_sha
    return Row("otaguard", len(patch), tc, ta, ok), peak, streams


def bench_bsdiff4(old: bytes, new: bytes) -> Row:
    import bsdiff4

    patch, tc = timed(lambda: bsdiff4.diff(old, new))
    assert isinstance(patch, bytes)
    out, ta = timed(lambda: bsdiff4.patch(old, patch))
    return Row("bsdiff4 (bz2)", len(patch), tc, ta, out == new)


def bench_xdelta3(old_p: Path, new_p: Path, new: bytes, tmp: Path) -> Row:
    p, o = tmp / "x.vcdiff", tmp / "x.out"
    _, tc = timed(lambda: run("xdelta3", "-9", "-e", "-f", "-s", old_p, new_p, p))
    _, ta = timed(lambda: run("xdelta3", "-d", "-f", "-s", old_p, p, o))
    return Row("xdelta3 -9", p.stat().st_size, tc, ta, o.read_bytes() == new)


def bench_zstd(old_p: Path, new_p: Path, new: bytes, tmp: Path) -> Row:
    p, o = tmp / "z.zst", tmp / "z.out"
    size = max(old_p.stat().st_size, new_p.stat().st_size)
    # zstd -19 uses an 8 MiB window; larger bases need --long so the whole base is reachable.
    long = [f"--long={max(27, size.bit_length() + 1)}"] if size > (8 << 20) else []
    _, tc = timed(
        lambda: run("zstd", "-q", "-f", "-19", *long, f"--patch-from={old_p}", new_p, "-o", p)
    )
    _, ta = timed(lambda: run("zstd", "-q", "-f", "-d", *long, f"--patch-from={old_p}", p, "-o", o))
    flag = " " + long[0] if long else ""
    return Row(f"zstd -19{flag} --patch-from", p.stat().st_size, tc, ta, o.read_bytes() == new)


def bench_detools(old: bytes, new: bytes, compression: str) -> Row:
    import detools

    def create() -> bytes:
        f = io.BytesIO()
        detools.create_patch(
            io.BytesIO(old), io.BytesIO(new), f, compression=compression, patch_type="sequential"
        )
        return f.getvalue()

    patch, tc = timed(create)
    assert isinstance(patch, bytes)

    def apply() -> bytes:
        out = io.BytesIO()
        detools.apply_patch(io.BytesIO(old), io.BytesIO(patch), out)
        return out.getvalue()

    out, ta = timed(apply)
    return Row(f"detools seq/{compression}", len(patch), tc, ta, out == new)


def xz_size(new_p: Path) -> int:
    r = subprocess.run(["xz", "-9e", "-c", "-T1", str(new_p)], check=True, capture_output=True)
    return len(r.stdout)


def ensure_corpus(corpus: Path, quick: bool) -> None:
    env = dict(os.environ)
    if quick:
        env["SKIP_DEBIAN"] = "1"
    subprocess.run(["bash", str(ROOT / "scripts" / "corpus.sh"), str(corpus)], check=True, env=env)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}")
    ap.add_argument("--pairs", nargs="*", help="pair names (default: every cached pair)")
    ap.add_argument("--corpus", type=Path, default=ROOT / ".cache" / "corpus")
    args = ap.parse_args()
    for tool in ("xdelta3", "zstd", "xz"):
        if shutil.which(tool) is None:
            print(f"missing {tool} (scripts/system-deps.sh installs it)", file=sys.stderr)
            return 2
    ensure_corpus(args.corpus, args.quick)
    pairs_dir = args.corpus / "pairs"
    names = args.pairs or (list(QUICK) if args.quick else sorted(os.listdir(pairs_dir)))
    summary = []
    t_all = time.perf_counter()
    for name in names:
        old_p, new_p = pairs_dir / name / "old", pairs_dir / name / "new"
        old, new = old_p.read_bytes(), new_p.read_bytes()
        xz = xz_size(new_p)
        with tempfile.TemporaryDirectory() as td:
            tmp = Path(td)
            og, peak, streams = bench_otaguard(old_p, new_p, tmp)
            peers = [
                bench_bsdiff4(old, new),
                bench_xdelta3(old_p, new_p, new, tmp),
                bench_zstd(old_p, new_p, new, tmp),
                bench_detools(old, new, "heatshrink"),
            ]
            others = [bench_detools(old, new, c) for c in ("lzma", "zstd", "bz2")]
            peers.append(min(others, key=lambda r: r.size))
        print(f"\n### {name}: old {len(old)} B, new {len(new)} B, xz -9e {xz} B\n")
        print("| tool | patch B | % of new | % of xz -9e | create s | apply s | output |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for r in [og, *peers]:
            print(
                f"| {r.tool} | {r.size} | {100 * r.size / len(new):.2f} | "
                f"{100 * r.size / xz:.1f} | {r.create_s:.2f} | {r.apply_s:.2f} | "
                f"{'ok' if r.ok else 'FAILED'} |"
            )
        print(
            f"\notaguard streams ctrl/diff/extra (compressed B): {streams}; peak apply heap "
            f"{peak / 1024:.0f} KiB"
        )
        best = min((r for r in peers if r.ok), key=lambda r: r.size)
        meets = og.ok and og.size <= SIZE_SLACK * best.size and peak < MEM_LIMIT
        summary.append((name, len(new), xz, og, best, peak, meets))
        sys.stdout.flush()
    print("\n### Summary\n")
    print(
        "| pair | new B | otaguard B | % of xz -9e | best peer | peer B | otaguard/peer "
        "| peak apply heap | target met |"
    )
    print("|---|---:|---:|---:|---|---:|---:|---:|---|")
    for name, n, xz, og, best, peak, meets in summary:
        print(
            f"| {name} | {n} | {og.size} | {100 * og.size / xz:.1f} | {best.tool} | {best.size} | "
            f"{og.size / best.size:.3f} | {peak / 1024:.0f} KiB | {'yes' if meets else 'NO'} |"
        )
    print(f"\ntotal bench time {time.perf_counter() - t_all:.0f} s")
    return 0 if all(s[-1] for s in summary) else 1


if __name__ == "__main__":
    sys.exit(main())
