"""The product grub.cfg (src/otaguard/device/linux/files/grub.cfg) on real GRUB in QEMU.

Each test assembles a disk (GPT: ESP with the two env copies, slot A = version 1.0, slot B =
version 2.0, data), boots it through OVMF and GRUB and checks GRUB's console line
(``OTAGUARD-GRUB: slot=... env=...``), the guest init's line (``OTAGUARD-VM: slot=...
version=...``) and, after QEMU exits (the guest init ends in ``reboot -f`` and QEMU runs with
-no-reboot), the env copies GRUB left on the ESP.
"""

from __future__ import annotations

import http.server
import re
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from . import build
from .machine import Machine

pytestmark = pytest.mark.vm

BOOT_TIMEOUT = 240.0  # TCG on a loaded 2-core CI runner
GRUB_RX = re.compile(
    r"^.*OTAGUARD-GRUB: slot=(?P<slot>[AB]) state=(?P<state>\S*) tries-left=(?P<tries>\S*) "
    r"env=(?P<env>\S+)$",
    re.MULTILINE,
)
VM_RX = re.compile(r"^OTAGUARD-VM: slot=(?P<slot>[AB]) version=(?P<version>\S*)$", re.MULTILINE)
VERSIONS = {"A": "1.0", "B": "2.0"}


@pytest.fixture(scope="module")
def slots() -> dict[str, Path]:
    build.require_vm_tools()
    return {
        "A": build.slot_image(VERSIONS["A"]),
        "B": build.slot_image(VERSIONS["B"], extra=b"version 2.0 payload\n" * 64),
    }


def og_env(
    order: str, a_state: str, b_state: str, a_tries: int = 0, b_tries: int = 0
) -> dict[str, str]:
    return {
        "OG_SEQ": "7",
        "OG_ORDER": order,
        "OG_A_STATE": a_state,
        "OG_B_STATE": b_state,
        "OG_A_TRIES": str(a_tries),
        "OG_B_TRIES": str(b_tries),
        "OG_SUM": "0123abcd",
    }


def make_disk(tmp_path: Path, slots: dict[str, Path], env: dict[str, str]) -> Path:
    return build.disk(
        tmp_path / "disk.img", slot_a=slots["A"], slot_b=slots["B"], data_dir=None, env=env
    )


def boot(disk: Path, tmp_path: Path, name: str = "vm") -> tuple[re.Match[str], re.Match[str]]:
    """Boot once until the guest reboots (QEMU exits); GRUB's and init's lines."""
    with Machine(disk, tmp_path, name=name) as m:
        grub = m.wait_for(GRUB_RX, BOOT_TIMEOUT)
        vm = m.wait_for(VM_RX, BOOT_TIMEOUT)
        up = m.elapsed()
        m.wait_for(r"^OTAGUARD-VM: done$", BOOT_TIMEOUT)
        assert m.wait_exit(60) == 0
        print(f"[{name}] accel={m.accel} slot line after {up:.1f}s, exit after {m.elapsed():.1f}s")
        assert "OTAGUARD-VM: error" not in m.log_text(), m.log_text()[-3000:]
    assert vm["slot"] == grub["slot"]
    assert vm["version"] == VERSIONS[vm["slot"]]
    return grub, vm


def test_a_good_boots_a(tmp_path: Path, slots: dict[str, Path]) -> None:
    env = og_env("A B", "good", "good")
    disk = make_disk(tmp_path, slots, env)
    grub, _ = boot(disk, tmp_path)
    assert (grub["slot"], grub["state"], grub["env"]) == ("A", "good", "0")
    # Nothing to decrement: GRUB wrote nothing.
    for copy in (0, 1):
        assert build.read_env(disk, copy) == {"OG_VALID": "1", **env}


def test_pending_b_decrements_tries_across_boots(tmp_path: Path, slots: dict[str, Path]) -> None:
    env = og_env("B A", "good", "pending", a_tries=0, b_tries=3)
    disk = make_disk(tmp_path, slots, env)
    for n, left in enumerate(("2", "1"), 1):
        grub, _ = boot(disk, tmp_path, name=f"boot{n}")
        assert (grub["slot"], grub["state"], grub["tries"], grub["env"]) == (
            "B",
            "pending",
            left,
            "0",
        )
        # save_env on the FAT ESP: both copies carry the new count, everything else untouched
        # (OG_SUM and OG_SEQ included: GRUB only ever writes OG_B_TRIES here).
        for copy in (0, 1):
            assert build.read_env(disk, copy) == {"OG_VALID": "1", **env, "OG_B_TRIES": left}


def test_pending_without_tries_falls_back_to_a(tmp_path: Path, slots: dict[str, Path]) -> None:
    env = og_env("B A", "good", "pending", b_tries=0)
    disk = make_disk(tmp_path, slots, env)
    grub, _ = boot(disk, tmp_path)
    assert (grub["slot"], grub["state"], grub["env"]) == ("A", "good", "0")
    for copy in (0, 1):
        assert build.read_env(disk, copy) == {"OG_VALID": "1", **env}


def test_corrupt_copy0_uses_copy1(tmp_path: Path, slots: dict[str, Path]) -> None:
    # Copy 0 says A; it is destroyed; copy 1 says B (good, first in order).
    disk = make_disk(tmp_path, slots, og_env("A B", "good", "good"))
    build.write_env(disk, 1, {"OG_VALID": "1", **og_env("B A", "good", "good")})
    build.esp_write(disk, build.ENV_COPIES[0], b"\xa5garbage" * 128)
    grub, _ = boot(disk, tmp_path)
    assert (grub["slot"], grub["state"], grub["env"]) == ("B", "good", "1")


def test_both_copies_corrupt_boot_a(tmp_path: Path, slots: dict[str, Path]) -> None:
    # Both copies would say "B"; both are destroyed (one garbage, one without OG_VALID).
    disk = make_disk(tmp_path, slots, og_env("B A", "bad", "good"))
    build.esp_write(disk, build.ENV_COPIES[0], b"\0" * build.GRUBENV_SIZE)
    build.write_env(disk, 1, og_env("B A", "bad", "good"))  # no OG_VALID
    grub, _ = boot(disk, tmp_path)
    assert (grub["slot"], grub["state"], grub["env"]) == ("A", "good", "default")


def test_hanging_image_and_power_cut(tmp_path: Path, slots: dict[str, Path]) -> None:
    hang = build.slot_image("3.0-hang", hang=True)
    env = og_env("B A", "good", "pending", b_tries=1)
    disk = build.disk(tmp_path / "disk.img", slot_a=slots["A"], slot_b=hang, data_dir=None, env=env)
    with Machine(disk, tmp_path) as m:
        grub = m.wait_for(GRUB_RX, BOOT_TIMEOUT)
        assert (grub["slot"], grub["tries"]) == ("B", "0")
        assert m.wait_for(VM_RX, BOOT_TIMEOUT)["version"] == "3.0-hang"
        m.wait_for(r"^OTAGUARD-VM: hanging$", 60)
        m.kill()
        assert not m.running
    # The next boot: B is pending with no tries left, so GRUB goes back to A.
    grub, vm = boot(disk, tmp_path, name="after")
    assert (grub["slot"], grub["state"], vm["version"]) == ("A", "good", "1.0")


class _Hello(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"hello-from-host {self.path}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def host_http() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


FAKE_AGENT = """#!/bin/sh
# Stands in for `otaguard` in the guest: $1=agent $2=<step> $3=--config $4=<path>
step=$2
echo "FAKE-AGENT: step=$step config=$4 uid=$(id -u) home=$HOME path=$PATH"
case $step in
boot-check)
    exec {python} -c 'import urllib.request as u
print("FAKE-AGENT: fetched", u.urlopen("http://10.0.2.100:8443/ping", timeout=30).read().decode())'
    ;;
self-test) exec /media/usr/lib/otaguard/self-test ;;
mark-good|mark-bad) echo "$step" >> /mnt/steps; exit 0 ;;
run)
    touch /media/probe 2>/dev/null && echo "FAKE-AGENT: slot is writable"
    echo run >> /mnt/steps
    exit 7
    ;;
esac
exit 99
"""


def test_init_runs_agent_steps_with_guestfwd(
    tmp_path: Path, slots: dict[str, Path], host_http: int
) -> None:
    """The init contract: boot.env on the data partition, the agent steps in order inside
    chroot /host, the slot read-only at /media, the data partition writable at /mnt, and
    10.0.2.100:8443 reaching a host port through restrict=on user networking."""
    bad = build.slot_image("2.1-bad", self_test_ok=False)
    data = tmp_path / "data"
    data.mkdir()
    agent = data / "fake-otaguard"
    agent.write_text(FAKE_AGENT.format(python=sys.executable))
    agent.chmod(0o755)
    (data / "boot.env").write_text(
        "OTAGUARD_BIN=/mnt/fake-otaguard\nOTAGUARD_CONFIG=/mnt/agent.toml\n"
    )
    env = og_env("B A", "good", "pending", b_tries=2)
    disk = build.disk(tmp_path / "disk.img", slot_a=slots["A"], slot_b=bad, data_dir=data, env=env)
    with Machine(disk, tmp_path, host_port=host_http) as m:
        assert m.wait_for(VM_RX, BOOT_TIMEOUT)["version"] == "2.1-bad"
        line = m.wait_for(r"^FAKE-AGENT: step=boot-check (.*)$", BOOT_TIMEOUT)[1]
        assert "config=/mnt/agent.toml uid=0 home=/root" in line
        assert "path=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" in line
        m.wait_for(r"^FAKE-AGENT: fetched hello-from-host /ping$", BOOT_TIMEOUT)
        for step, rc in (("boot-check", 0), ("self-test", 1), ("mark-bad", 0), ("run", 7)):
            m.wait_for(rf"^OTAGUARD-VM: {step} rc={rc}$", BOOT_TIMEOUT)
        m.wait_for(r"^OTAGUARD-VM: done$", BOOT_TIMEOUT)
        assert m.wait_exit(60) == 0
        print(f"agent steps: accel={m.accel} total {m.elapsed():.1f}s")
        assert "slot is writable" not in m.log_text()
    assert build.data_read(disk, "/steps") == b"mark-bad\nrun\n"
