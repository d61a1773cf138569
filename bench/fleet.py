"""Fleet simulator benchmark: wall time, peak memory and simulated time to 99% of a scenario.

    .venv/bin/python bench/fleet.py                       # --scenario hvac-14k (the target)
    .venv/bin/python bench/fleet.py --devices 2000        # a smaller fleet, same profile

Targets (issue 8): the 14,000-device, 14-day scenario in < 10 min wall on this 2-core machine;
99% of reachable devices patched (and on the rotated key list) in < 48 simulated hours.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

from otaguard.cli.simulate import options_from, run_simulation
from otaguard.sim.model import SCENARIOS

TICK = os.sysconf("SC_CLK_TCK")


class RoleCpu:
    """CPU seconds per kind of child process, read from /proc every ``interval`` s (each
    process's last reading counts: a child's CPU is complete shortly before it exits, and
    ``getrusage(RUSAGE_CHILDREN)`` only gives the sum). Roles by command line: the server
    processes (``otaguard.sim.serverproc``) and the multiprocessing children (the device
    shards, then the reboot-check workers)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.last: dict[int, tuple[str, float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RoleCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.wait(self.interval):
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    with open(f"/proc/{pid}/stat") as f:
                        st = f.read().rsplit(")", 1)[1].split()
                    if int(st[1]) != me:  # children of this process only
                        continue
                    with open(f"/proc/{pid}/cmdline", "rb") as f:
                        cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                except (OSError, IndexError, ValueError):
                    continue
                if "serverproc" in cmd:
                    role = "servers"
                elif "spawn_main" in cmd:
                    role = "shards"
                else:
                    continue
                self.last[int(pid)] = (role, (int(st[11]) + int(st[12])) / TICK)

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for role, cpu in self.last.values():
            out[role] = out.get(role, 0.0) + cpu
        return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scenario", default="hvac-14k", choices=sorted(SCENARIOS))
    ap.add_argument("--devices", type=int, default=None)
    ap.add_argument("--workers", type=int, default=None, help="device threads (scenario's)")
    ap.add_argument("--server-procs", type=int, default=None, help="server processes (2)")
    ap.add_argument("--sim-procs", type=int, default=None, help="simulator processes (2)")
    ap.add_argument("--out", type=Path, default=None)
    a = ap.parse_args()
    opts = options_from(SCENARIOS[a.scenario], devices=a.devices, workers=a.workers, hsm="software")
    if a.server_procs is not None:
        opts = dataclasses.replace(opts, server_procs=a.server_procs).validate()
    if a.sim_procs is not None:
        opts = dataclasses.replace(opts, sim_procs=a.sim_procs).validate()
    out = a.out or Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    w0 = time.monotonic()
    with RoleCpu() as roles:
        r = run_simulation(opts, out, quiet=True)
    wall = time.monotonic() - w0
    cpu_roles = roles.totals()
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak_mib, server_mib = me.ru_maxrss / 1024, kids.ru_maxrss / 1024
    cpu_me, cpu_kids = me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime
    t99 = r["time_to_patch_h"]["t99_h"]
    kl = (r["key_rotation"] or {}).get("time_to_keylist_h", {}).get("t99_h")
    rows = [
        ("devices (reachable)", f"{r['fleet']['devices']} ({r['fleet']['reachable']})"),
        ("wall time total", f"{wall:.0f} s"),
        ("wall: setup / run", f"{r['wall_s']}"),
        ("peak RSS main process / largest child", f"{peak_mib:.0f} / {server_mib:.0f} MiB"),
        ("CPU main / children (servers, shards, reboot)", f"{cpu_me:.0f} / {cpu_kids:.0f} s "
         f"({100 * (cpu_me + cpu_kids) / wall:.0f}% of one core)"),
        ("CPU servers / shards + reboot check (sampled)",
         f"{cpu_roles.get('servers', 0):.0f} / {cpu_roles.get('shards', 0):.0f} s"),
        ("simulated time run", f"{r['simulated_h']:.1f} h ({r['stopped']})"),
        ("check-ins over HTTPS", f"{r['traffic']['checkins']}"),
        ("check-ins / wall s (run)", f"{r['traffic']['checkins'] / max(1e-9, r['wall_s']['run']):.0f}"),
        ("time to 95/99/100% patched", " / ".join(
            "never" if r["time_to_patch_h"][k] is None else f"{r['time_to_patch_h'][k]:.1f} h"
            for k in ("t95_h", "t99_h", "t100_h"))),
        ("time to 99% on new key list", "n/a" if kl is None else f"{kl:.1f} h"),
        ("checks", str(r["checks"])),
        ("target wall < 600 s", "met" if wall < 600 else "MISSED"),
        ("target 99% < 48 h", "met" if t99 is not None and t99 < 48 else "MISSED"),
    ]  # fmt: skip
    for k, v in rows:
        print(f"| {k} | {v} |")
    print(f"outputs in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
