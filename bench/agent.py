"""Linux agent install: peak RSS and time of ``otaguard agent install`` vs ``dd`` writing the
same image into the same slot file, for growing image sizes.

    .venv/bin/python bench/agent.py                 # 16, 64, 256 MiB
    .venv/bin/python bench/agent.py --sizes 16 64   # quicker

Each install runs in its own process (the real CLI: config, state directory, slot files,
GRUB env files) so ``ru_maxrss`` is the agent's whole peak resident set, interpreter
included. Target (issue 15): flat in image size, < 64 MiB RSS at 256 MiB.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from otaguard.device.device import Provisioning
from otaguard.device.lab import Lab, chunks
from otaguard.device.linux.config import AgentConfig
from otaguard.device.linux.system import LinuxDevice

MIB = 1024 * 1024
PIN = "ab" * 32


def write_image(path: Path, size: int, seed: int) -> None:
    block = hashlib.sha256(str(seed).encode()).digest() * (MIB // 32)
    with path.open("wb") as f:
        for i in range(size // MIB):
            f.write(block[i % 7 :] + block[: i % 7])


def child_run(argv: list[str]) -> tuple[float, int]:
    """Wall seconds and the child's own peak RSS in KiB, through GNU time: a process forked
    from this interpreter inherits its high-water mark across exec (Linux keeps the larger
    ``maxrss``), one forked from ``time`` does not."""
    with tempfile.NamedTemporaryFile("r") as out:
        t0 = time.perf_counter()
        proc = subprocess.run(
            ["/usr/bin/time", "-f", "%M", "-o", out.name, *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{argv[0]} failed: {proc.stderr.strip()}")
        return wall, int(out.read().split()[-1])


def measure(root: Path, size_mib: int, lab: Lab) -> tuple[tuple[float, int], tuple[float, int]]:
    d = root / f"s{size_mib}"
    (d / "state").mkdir(parents=True)
    (d / "esp").mkdir()
    slot_bytes = (size_mib + 4) * MIB
    for s in ("a", "b"):
        with (d / f"slot-{s}.img").open("wb") as f:
            f.truncate(slot_bytes)
    (d / "cmdline").write_text("otaguard.slot=A\n")
    cfg_path = d / "agent.toml"
    cfg_path.write_text(
        f'[server]\nurl = "https://127.0.0.1:1"\nspki_pins = ["{PIN}"]\n'
        f'[device]\nstate_dir = "{d / "state"}"\nrun_dir = "{d / "run"}"\n'
        f'slot_a = "{d / "slot-a.img"}"\nslot_b = "{d / "slot-b.img"}"\n'
        f'[bootloader]\ngrubenv = ["{d / "esp/0"}", "{d / "esp/1"}"]\ncmdline = "{d / "cmdline"}"\n'
    )
    cfg = AgentConfig.load(cfg_path)
    factory = b"factory" * 1000
    prov = Provisioning(
        lab.bundle, lab.vendor_id, lab.class_id, lab.model, lab.hw_rev,
        lab.release(factory, version="1.0.0", seq=1, counter=1),
    )  # fmt: skip
    LinuxDevice(cfg, running=0, provisioning=True).provision(prov, chunks(factory))
    rel = d / "rel"
    rel.mkdir()
    write_image(rel / "image.bin", size_mib * MIB, size_mib)
    digest = hashlib.sha256()
    with (rel / "image.bin").open("rb") as f:
        while b := f.read(MIB):
            digest.update(b)
    (rel / "manifest.suit").write_bytes(
        lab.release((digest.digest(), size_mib * MIB), version="2.0.0", seq=2, counter=1)
    )
    otaguard = str(Path(sys.executable).parent / "otaguard")
    ours = child_run([otaguard, "agent", "install", "--config", str(cfg_path), str(rel)])
    dd = child_run(
        ["dd", f"if={rel / 'image.bin'}", f"of={d / 'slot-b.img'}", "bs=1M", "conv=notrunc,fsync",
         "status=none"]
    )  # fmt: skip
    return ours, dd


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 64, 256])
    args = ap.parse_args()
    lab = Lab(now=int(time.time()))
    print(
        f"{'image':>8} | {'agent RSS':>10} | {'dd RSS':>8} | {'agent s':>8} | {'dd s':>6} | ratio"
    )
    print("-" * 64)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        for size in args.sizes:
            (ours_s, ours_kib), (dd_s, dd_kib) = measure(Path(tmp), size, lab)
            print(
                f"{size:>4} MiB | {ours_kib / 1024:>6.1f} MiB | {dd_kib / 1024:>4.1f} MiB | "
                f"{ours_s:>8.2f} | {dd_s:>6.2f} | {ours_s / dd_s:.2f}x"
            )


if __name__ == "__main__":
    main()
