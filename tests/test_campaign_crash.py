"""SIGKILL the real server process (``otaguard server run``) in the middle of a campaign —
right after it acknowledged a device's "installed" report — and restart it on the same data:
every acknowledged report is still there, counted once, and the campaign runs to completion
(the device whose "confirmed" report died with the server is recognised at its next check-in).
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import os
import signal
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from otaguard.adminclient import AdminClient
from otaguard.device.lab import Lab
from otaguard.server.pki.ca import FleetCA
from otaguard.server.pki.enroll import Enrollment, enroll_device
from otaguard.server.storage import models as m
from otaguard.server.storage.db import Database
from tests.campaign_fleet import Fleet, release, token
from tests.pg import db_url, fleet_ca, pg_cluster, server_tls  # noqa: F401


def _start(data: Path, tls: Path, db: str, key: Path) -> tuple[subprocess.Popen[str], str, str]:
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "otaguard.cli.main", "server", "run"),
            *("--data-dir", str(data), "--db", db, "--ca-cert", str(tls / "ca.pem")),
            *("--tls-cert", str(tls / "server.pem"), "--tls-key", str(tls / "server.key")),
            *("--port", "0", "--admin-port", "0", "--trusted-key", str(key)),
            *("--device-rate", "1000", "--device-burst", "1000"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("listening"):
        proc.kill()
        raise AssertionError(f"server did not start: {line!r} {proc.stderr.read()}")  # type: ignore[union-attr]
    dev, adm = (part.split("=")[1] for part in line.split()[1:3])
    return proc, f"https://{dev}", f"https://{adm}"


def _acked_in_db(db: Database) -> set[tuple[str, str]]:
    with db.read() as conn:
        rows = conn.execute(
            select(m.devices.c.serial, m.status_reports.c.report_id).select_from(
                m.status_reports.join(m.devices, m.devices.c.id == m.status_reports.c.device_id)
            )
        ).all()
    return {(r.serial, r.report_id) for r in rows}


def test_sigkill_mid_campaign_loses_nothing(
    db_url: str, fleet_ca: FleetCA, server_tls: Path, tmp_path: Path
) -> None:
    lab = Lab()
    key = tmp_path / "op.pem"
    key.write_bytes(lab.op.public_key.to_pem())
    db = Database(db_url)
    db.upgrade()
    enrolled: dict[str, Enrollment] = {}
    for i in range(6):
        s = f"SN-K{i}"
        enrolled[s] = enroll_device(
            fleet_ca, db, serial=s, model=lab.model, hw_rev=lab.hw_rev, groups=[],
            out_dir=tmp_path / "certs" / s,
        )  # fmt: skip
    rm_token, op_token = token(db, "release-manager"), token(db, "operator")
    data = tmp_path / "data"
    proc, dev_url, adm_url = _start(data, server_tls, db_url, key)
    ctx = ssl.create_default_context(cafile=str(server_tls / "ca.pem"))

    def admin(url: str, tok: str) -> httpx.Client:
        return httpx.Client(base_url=url, verify=ctx, headers={"Authorization": f"Bearer {tok}"})

    fleet = Fleet(lab, db, enrolled.__getitem__, dev_url, tmp_path)
    try:
        for s in enrolled:
            fleet.add(s)
        assert {r.outcome for r in fleet.poll_all().values()} == {"idle"}
        with admin(adm_url, rm_token) as rm, admin(adm_url, op_token) as op:
            rid = release(rm, lab, "1.1.0", 2)
            spec = {
                "id": "crash-1",
                "release_id": rid,
                "selector": {"model": lab.model},
                "phases": [{"fraction": 0.5}, {"fraction": 1.0}],
                "success_threshold": "all_finished",
            }
            AdminClient(op).create_campaign(spec)
            assert AdminClient(op).campaign_action("crash-1", "start")["status"] == "running"

        installed: list[str] = []

        def kill_after_second_install(body: dict[str, Any]) -> None:
            if body.get("event") == "installed":
                installed.append(body["report_id"])
                if len(installed) == 2:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=10)

        for sd in fleet.devices.values():
            sd.updater.transport.after_report = kill_after_second_install  # type: ignore[attr-defined]
        results = fleet.poll_all()
        assert proc.returncode == -signal.SIGKILL
        outcomes = sorted(r.outcome for r in results.values())
        assert outcomes.count("confirmed") == 2, results  # the 2nd one's report was lost
        assert "unreachable" in outcomes
        acked_before = set(fleet.acked)
        assert len(acked_before) == 3  # installed, confirmed, installed
        db.dispose()

        proc, dev_url, adm_url = _start(data, server_tls, db_url, key)
        assert acked_before <= _acked_in_db(db)  # every acknowledged report survived
        fleet.reconnect(dev_url)
        for sd in fleet.devices.values():
            sd.updater.transport.after_report = None  # type: ignore[attr-defined]
        with admin(adm_url, op_token) as op:
            for _ in range(4):
                fleet.poll_all()
                st = AdminClient(op).campaign("crash-1")
                if st["status"] == "completed":
                    break
            assert st["status"] == "completed", st
            assert st["counts"]["succeeded"] == 6 and st["counts"]["failed"] == 0
        assert set(fleet.versions().values()) == {"1.1.0"}
        in_db = _acked_in_db(db)
        assert set(fleet.acked) <= in_db
        with db.read() as conn:
            n = conn.execute(select(m.status_reports.c.id)).all()
        assert len(n) == len(in_db)  # each report stored once
    finally:
        fleet.close()
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)
        db.dispose()
