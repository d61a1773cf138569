"""The Linux agent in QEMU: time from a published release to the new slot confirmed, next to
the bare boot the same machine needs (the reference: what no update agent can go below).

    .venv/bin/python bench/vm.py            # one run, full image and delta
    OTAGUARD_VM_ACCEL=tcg .venv/bin/python bench/vm.py

Uses the VM test rig (tests/vm: OVMF, the shipped grub.cfg, Debian's kernel, host Python over
9p). Prints, for a full-image and a delta update: QEMU start to the init's first line (bare
boot), first boot to the agent's idle poll, and release published to ``mark-good``.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.vm import build
from tests.vm.backend import backend, provision_disk
from tests.vm.test_vm_update import BOOT, Rig, first_boot_idle, install_and_reboot


def one(tmp: Path, delta: bool) -> tuple[str, float, float, float, int]:
    images = {
        "1.0.0": build.slot_image("1.0.0"),
        "2.0.0": build.slot_image("2.0.0", extra=b"2.0.0 payload\n" * 512),
    }
    with backend(tmp / "server") as be:
        factory = be.publish("1.0.0", images["1.0.0"], counter=1)
        disk = provision_disk(be, tmp / "disk.img", factory, max_tries=2)
        rig = Rig(be, disk, tmp / "vm")
        t0 = time.monotonic()
        vm = first_boot_idle(rig)
        bare = rig.boots[0].seconds
        to_idle = time.monotonic() - t0
        sent = be.relay.sent
        t1 = time.monotonic()
        rel = be.publish("2.0.0", images["2.0.0"], counter=2, delta_from="1.0.0" if delta else None)
        publish_s = time.monotonic() - t1
        be.assign(rel)
        install_and_reboot(rig, vm, rel)
        vm = rig.start()
        rig.booted(vm)
        vm.wait_for(r"mark-good: slot B version 2\.0\.0 confirmed", BOOT)
        total = time.monotonic() - t1 - publish_s
        fetched = be.relay.sent - sent
        vm.kill()
        return vm.accel, bare, to_idle, total, fetched


def main() -> None:
    build.require_vm_tools()
    print(
        f"{'update':>6} | {'accel':>5} | {'bare boot':>9} | {'boot→idle poll':>14} | {'assigned→confirmed':>18} | {'bytes to device':>15} | ratio"
    )
    print("-" * 96)
    for delta in (False, True):
        with tempfile.TemporaryDirectory(dir=Path.home()) as t:
            accel, bare, idle, total, fetched = one(Path(t), delta)
        print(
            f"{'delta' if delta else 'full':>6} | {accel:>5} | {bare:>7.1f} s | {idle:>12.1f} s | "
            f"{total:>16.1f} s | {fetched:>15,} | {total / bare:.1f}x bare boot"
        )


if __name__ == "__main__":
    main()
