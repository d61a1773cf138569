"""SIGKILL the real server process (``otaguard server run``) after it acknowledged reports,
restart it on the same data: every acknowledged report is still there, counted once."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import httpx

from otaguard.server.pki.ca import FleetCA
from otaguard.server.pki.enroll import Enrollment, enroll_device
from otaguard.server.storage import store
from otaguard.server.storage.db import Database
from tests.pg import db_url, device_context, fleet_ca, pg_cluster, server_tls  # noqa: F401
from tests.support import server_run_argv


def _start(data: Path, tls: Path, db: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        server_run_argv(data, tls, "--db", db, "--device-rate", "1000", "--device-burst", "1000"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening"):
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {proc.stderr.read()}")  # type: ignore[union-attr]
    port = int(line.split()[1].split("=")[1].rsplit(":", 1)[1])
    return proc, port


def test_sigkill_keeps_acknowledged_reports(
    db_url: str, fleet_ca: FleetCA, server_tls: Path, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    db = Database(db_url)
    db.upgrade()
    e: Enrollment = enroll_device(
        fleet_ca, db, serial="SN-K", model="gw", hw_rev="r1", groups=[], out_dir=tmp_path / "d"
    )
    db.dispose()
    proc, port = _start(data, server_tls, db_url)
    acked: list[str] = []
    try:
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=device_context(e)) as c:
            for i in range(40):
                r = c.post("/v1/reports", json={"report_id": f"k-{i}", "state": "installing"})
                assert r.status_code == 201
                acked.append(f"k-{i}")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    proc, port = _start(data, server_tls, db_url)
    try:
        with httpx.Client(base_url=f"https://127.0.0.1:{port}", verify=device_context(e)) as c:
            # The device re-sends the last report (it never saw the ack): counted once.
            r = c.post("/v1/reports", json={"report_id": acked[-1], "state": "installing"})
            assert r.status_code == 200 and r.json()["duplicate"] is True
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    db = Database(db_url)
    with db.read() as conn:
        row = store.device_by_serial(conn, "SN-K")
        assert row is not None
        assert store.count_reports(conn, row.id) == len(acked)
    db.dispose()
