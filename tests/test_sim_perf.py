"""What makes the 14,000-device scenario fit the machine, each checked for real:

- a parked flash gives its file descriptor back and reopens on the next access (so every
  device can hold a keep-alive connection under the open-files limit);
- the device HTTPS client keeps its connection across an idle longer than its default 5 s
  when asked to (``keepalive_expiry=None``), and by default still drops it;
- the end-of-run reboot check gives the same answer split over processes as in-process, and
  reports a device whose flash no longer boots.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from otaguard.clock import SimClock
from otaguard.device.device import Device
from otaguard.device.flash import Flash, Geometry
from otaguard.device.https_transport import HttpsTransport
from otaguard.device.lab import chunks
from otaguard.server.pki.ca import FleetCA, write_private_key
from otaguard.server.pki.mtls import running, server_ssl_context
from otaguard.sim import world as W
from otaguard.sim.runner import reboot_check, reboot_fleet
from tests.pg import fleet_ca, server_tls  # noqa: F401


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_parked_flash_releases_its_descriptor_and_reopens(tmp_path: Path) -> None:
    flash = Flash(tmp_path / "f.bin", 8192, Geometry(4096, 256))
    flash.program(0, b"\x12\x34")
    before = _fds()
    flash.park()
    assert _fds() == before - 1
    flash.park()  # idempotent
    assert flash.read(0, 2) == b"\x12\x34"  # reopened on use, contents unchanged
    assert _fds() == before
    flash.park()
    flash.program(256, b"\x56")  # a write reopens too
    flash.erase_sector(4096)
    assert flash.read(256, 1) == b"\x56"
    flash.close()
    with pytest.raises(ValueError):  # closed means closed: no silent reopen
        flash.read(0, 1)
    flash.park()  # parking a closed part is a no-op
    with pytest.raises(ValueError):
        flash.read(0, 1)


def _device_identity(ca: FleetCA, d: Path, serial: str) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    issued = ca.issue_device(serial, key.public_key(), days=1)
    cert_p, key_p = d / "dev.pem", d / "dev.key"
    cert_p.write_bytes(issued.pem)
    write_private_key(key_p, key)
    return cert_p, key_p


@pytest.mark.parametrize("expiry", [None, 5.0])
def test_keepalive_connection_survives_a_long_idle_only_when_asked(
    expiry: float | None,
    fleet_ca: FleetCA,  # noqa: F811
    server_tls: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    peers: list[tuple[Any, bytes | None]] = []

    async def checkin(request: Request) -> JSONResponse:
        # the client's (host, port) names the TCP connection; the verified certificate is
        # what mTLS put in the scope for this connection
        peers.append((request.scope["client"], request.scope.get("otaguard.peer_cert_der")))
        return JSONResponse({"update": None})

    app = Starlette(routes=[Route("/v1/checkin", checkin, methods=["POST"])])
    ctx = server_ssl_context(
        server_tls / "server.pem", server_tls / "server.key", server_tls / "ca.pem"
    )
    cert, key = _device_identity(fleet_ca, tmp_path, "KA-0001")
    now = [1000.0]
    with running(app, ctx) as srv:
        t = HttpsTransport(
            srv.url,
            ca_file=server_tls / "ca.pem",
            cert_file=cert,
            key_file=key,
            keepalive_expiry=expiry,
            clock=lambda: now[0],
        )
        try:
            t.checkin({})
            now[0] += 3600  # an hour of idle, as far as the client's clock can tell
            t.checkin({})
        finally:
            t.close()
    assert len(peers) == 2
    assert all(der for _, der in peers)  # both requests authenticated by the certificate
    same = peers[0][0] == peers[1][0]
    assert same is (expiry is None)


def _fleet_of(tmp_path: Path, n: int) -> list[W.DeviceFiles]:
    keys = W.make_keys(tmp_path, rotation=False, mode="software")
    rel = W.make_releases(keys, 16384, seed=5, now=int(dt.datetime.now(dt.UTC).timestamp()))
    prov = rel.provisioning()
    ca = FleetCA.create(tmp_path / "ca", passphrase=b"test-passphrase-123")
    files: list[W.DeviceFiles] = []
    for i in range(n):
        d = tmp_path / f"dev{i}"
        Device.create(d, W.layout_for(len(rel.v_new)), prov, chunks(rel.v_old)).close()
        cert, key = _device_identity(ca, d, f"T-{i}")
        files.append(W.DeviceFiles(f"T-{i}", d, cert, key))
    return files


def test_reboot_check_in_processes_matches_in_process_and_finds_a_brick(
    tmp_path: Path,
) -> None:
    files = _fleet_of(tmp_path, 4)
    # wreck device 2: erase both slots' contents (the bootloader finds nothing to boot)
    now = dt.datetime.now(dt.UTC).timestamp()
    with W.open_device(files[2], SimClock(now)) as dev:
        for slot in dev.layout.slots:
            dev.flash.erase_range(slot.region.offset, slot.region.size)
    here = reboot_check(files, now)
    split = reboot_fleet(files, now, procs=2, chunk=1)
    assert split == here
    assert [v for v, _ in here] == [W.V_OLD, W.V_OLD, None, W.V_OLD]
    assert here[2][1] is not None and here[2][1].startswith("E_")


def test_flash_dir_uses_tmpfs_only_when_it_has_room(tmp_path: Path) -> None:
    shm = tmp_path / "shm"
    shm.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    d = W.flash_dir(work, 10, shm=shm)
    assert d.parent == shm and d.name.startswith("otaguard-sim-flash-")
    assert (d.stat().st_mode & 0o777) == 0o700  # private: mkdtemp
    free = os.statvfs(shm).f_bavail * os.statvfs(shm).f_frsize
    too_many = free // (1024 * 1024) + 1
    assert W.flash_dir(work, too_many, shm=shm) == work / "flash"
    assert W.flash_dir(work, 10, shm=tmp_path / "missing") == work / "flash"
    W.remove_flash_dir(d)
    assert not d.exists()


def test_flash_dirs_of_killed_runs_are_swept_and_live_ones_kept(tmp_path: Path) -> None:
    """tmpfs is RAM until removed: a SIGKILLed run's flash directory is removed by the next
    run; the directory of a run that is alive (in another process) is not."""
    import subprocess
    import sys
    import time

    shm = tmp_path / "shm"
    shm.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    # a run in another process that gets SIGKILLed while using its flash directory
    code = (
        "import sys, time; from pathlib import Path; from otaguard.sim import world as W;"
        "d = W.flash_dir(Path(sys.argv[1]), 10, shm=Path(sys.argv[2]));"
        "(d / 'flash.bin').write_bytes(b'x' * 4096); print(d, flush=True); time.sleep(600)"
    )
    killed = subprocess.Popen(
        [sys.executable, "-c", code, str(work), str(shm)], stdout=subprocess.PIPE, text=True
    )
    alive = subprocess.Popen(
        [sys.executable, "-c", code, str(work), str(shm)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert killed.stdout is not None and alive.stdout is not None
        dead_dir = Path(killed.stdout.readline().strip())
        live_dir = Path(alive.stdout.readline().strip())
        killed.kill()
        killed.wait()
        assert (dead_dir / "flash.bin").exists()  # SIGKILL removes nothing
        # an older run's directory without an owner file: kept while recent, swept when old
        legacy = shm / "otaguard-sim-flash-legacy"
        legacy.mkdir()
        other = shm / "unrelated"
        other.mkdir()
        mine = W.flash_dir(work, 10, shm=shm)  # the next run sweeps before it starts
        assert not dead_dir.exists()
        assert live_dir.exists() and (live_dir / "flash.bin").exists()
        assert legacy.exists() and other.exists()
        old = time.time() - 7200
        os.utime(legacy, (old, old))
        assert W.sweep_stale_flash(shm) == [legacy]
        assert mine.exists() and live_dir.exists() and other.exists()
        W.remove_flash_dir(mine)
    finally:
        for p in (killed, alive):
            p.kill()
            p.wait()
    assert W.sweep_stale_flash(shm) == [live_dir]  # its run is gone now too


def test_strict_clock_on_one_server_process(tmp_path: Path) -> None:
    """``lookahead_quanta=0`` (every quantum waits for its polls) with the server in a single
    process and the devices in the simulator's own (one in-process shard): the same checks
    pass and no poll ever saw the clock move."""
    import dataclasses

    from otaguard.cli.simulate import options_from, run_simulation
    from otaguard.sim.model import SCENARIOS

    base = options_from(
        SCENARIOS["demo"],
        devices=24,
        days=3,
        phases="25:1h,100",
        image_size=32768,
        hsm="software",
        seed=5,
    )
    opts = dataclasses.replace(base, lookahead_quanta=0, server_procs=1, sim_procs=1).validate()
    r = run_simulation(opts, tmp_path / "out", quiet=True)
    assert r["checks"] == {
        "no_attack_accepted": True,
        "no_device_bricked": True,
        "fleet_converged": True,
    }
    assert r["clock"]["max_poll_drift_s"] == 0
    assert r["traffic"]["checkins"] > 0
