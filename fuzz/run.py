"""Run the atheris fuzz targets (``make fuzz``) and print what they did.

    python fuzz/run.py [--runs N] [--targets cbor,manifest,...] [--update-corpus] [--jobs J]

Each target runs in its own process under libFuzzer (atheris), starting from a copy of its
committed corpus (``fuzz/corpus/<target>/``, or its generated seeds when that is empty), with
coverage instrumentation of the ``otaguard`` package. A crash, an oracle violation (see
``targets.py``) or a hang (``-timeout``) fails the run and leaves the input under
``fuzz/findings/``. ``--update-corpus`` replaces the committed corpus with the libFuzzer-merged
(minimised) union of the old corpus and what this run found.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MAX_LEN = 4096
LOGS = Path(tempfile.gettempdir()) / "otaguard-fuzz-logs"  # each target's libFuzzer output


def _child(name: str, args: list[str]) -> None:
    import logging

    import atheris

    logging.getLogger("otaguard").setLevel(logging.ERROR)
    sys.path.insert(0, str(ROOT))
    with atheris.instrument_imports(include=["otaguard"]):
        import otaguard.cbor
        import otaguard.delta.apply
        import otaguard.manifest.verify
        import otaguard.trust.documents  # noqa: F401
    from fuzz.targets import TARGETS

    target = TARGETS[name]
    target.seeds()  # builds the oracle's reference set before fuzzing starts
    # libFuzzer re-executes argv[0] for -merge and -fork: the wrapper script that runs this
    # child again with the same interpreter (see _wrapper).
    atheris.Setup([os.environ.get("FUZZ_ARGV0", sys.argv[0]), *args], target.run)
    atheris.Fuzz()


@dataclass
class Result:
    target: str
    executions: int
    seconds: float
    corpus: int
    failed: bool
    log: str


def _stat(log: str, name: str) -> int:
    m = re.search(rf"stat::{name}:\s+(\d+)", log)
    return int(m.group(1)) if m else 0


def _seed_dir(name: str, work: Path) -> None:
    committed = HERE / "corpus" / name
    files = sorted(committed.glob("*")) if committed.is_dir() else []
    if files:
        for f in files:
            shutil.copy(f, work / f.name)
        return
    sys.path.insert(0, str(ROOT))
    from fuzz.targets import TARGETS

    for seed in TARGETS[name].seeds():
        (work / hashlib.sha256(seed).hexdigest()).write_bytes(seed)


def _wrapper(tmp: Path, name: str) -> Path:
    """An executable that starts this target's child: libFuzzer runs argv[0] again to merge."""
    w = tmp / f"fuzz-{name}"
    w.write_text(
        f"#!/bin/sh\nexec '{sys.executable}' '{Path(__file__).resolve()}' --child {name} \"$@\"\n"
    )
    w.chmod(0o755)
    return w


def run_target(name: str, runs: int, update: bool, timeout_s: int) -> Result:
    findings = HERE / "findings" / name
    with tempfile.TemporaryDirectory(prefix=f"fuzz-{name}-") as tmp:
        work = Path(tmp) / "corpus"
        work.mkdir()
        _seed_dir(name, work)
        findings.mkdir(parents=True, exist_ok=True)
        wrapper = _wrapper(Path(tmp), name)
        env = {**os.environ, "FUZZ_ARGV0": str(wrapper)}
        cmd = [
            str(wrapper),
            str(work),
            f"-runs={runs}",
            f"-max_len={MAX_LEN}",
            f"-timeout={timeout_s}",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
            f"-artifact_prefix={findings}/",
        ]
        t0 = time.monotonic()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        seconds = time.monotonic() - t0
        log = proc.stdout + proc.stderr
        LOGS.mkdir(exist_ok=True)
        (LOGS / f"{name}.log").write_text(log[-200_000:])
        failed = proc.returncode != 0
        findings.mkdir(parents=True, exist_ok=True)  # another run may have tidied it away
        if not failed and not any(findings.iterdir()):
            with contextlib.suppress(OSError):  # a concurrent run may be using it
                findings.rmdir()
        corpus = len(list(work.iterdir()))
        if update and not failed:
            merged = Path(tmp) / "merged"
            merged.mkdir()
            m = subprocess.run(
                [str(wrapper), "-merge=1", str(merged), str(work), f"-max_len={MAX_LEN}"],
                capture_output=True, text=True, cwd=ROOT, env=env,
            )  # fmt: skip
            if m.returncode != 0 or not any(merged.iterdir()):
                raise RuntimeError(f"corpus merge for {name} failed:\n{m.stderr[-2000:]}")
            dest = HERE / "corpus" / name
            shutil.rmtree(dest, ignore_errors=True)
            dest.mkdir(parents=True)
            for f in merged.iterdir():
                shutil.copy(f, dest / hashlib.sha256(f.read_bytes()).hexdigest())
            corpus = len(list(dest.iterdir()))
        return Result(name, _stat(log, "number_of_executed_units"), seconds, corpus, failed, log)


def main() -> int:
    import logging

    logging.getLogger("otaguard").setLevel(logging.ERROR)
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        _child(sys.argv[2], sys.argv[3:])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=int(os.environ.get("FUZZ_RUNS", "2500000")))
    p.add_argument("--targets", default="cbor,manifest,keylist,delta")
    p.add_argument("--jobs", type=int, default=int(os.environ.get("FUZZ_JOBS", "2")))
    p.add_argument("--timeout", type=int, default=10, help="seconds per input before a hang")
    p.add_argument("--update-corpus", action="store_true")
    a = p.parse_args()
    names = [n for n in a.targets.split(",") if n]

    def one(name: str) -> Result:
        try:
            return run_target(name, a.runs, a.update_corpus, a.timeout)
        except Exception as exc:  # reported in the table, never lost
            return Result(name, 0, 0.0, 0, True, f"{type(exc).__name__}: {exc}")

    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        results = list(pool.map(one, names))
    print(f"{'target':<10} {'executions':>12} {'seconds':>9} {'exec/s':>8} {'corpus':>7}  result")
    for r in results:
        rate = r.executions / r.seconds if r.seconds else 0.0
        verdict = "FAILED (see fuzz/findings/)" if r.failed else "ok: 0 crashes, 0 hangs"
        print(
            f"{r.target:<10} {r.executions:>12,} {r.seconds:>9.0f} {rate:>8.0f} "
            f"{r.corpus:>7}  {verdict}"
        )
    total = sum(r.executions for r in results)
    print(f"{'total':<10} {total:>12,}")
    for r in results:
        if r.failed:
            print(f"--- {r.target} ---\n{r.log[-4000:]}", file=sys.stderr)
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
