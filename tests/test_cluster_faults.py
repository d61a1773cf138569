"""A node that loses its database answers 503 ``E_DATABASE`` with Retry-After (device and
admin listeners), says so on ``/healthz``, and serves again by itself once PostgreSQL is
back: no restart of the node."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import ssl
import time
from pathlib import Path

import httpx
from sqlalchemy import text

from otaguard.server.pki.ca import FleetCA
from otaguard.server.pki.enroll import enroll_device
from otaguard.server.sharedlimits import RETRY_SHARED_AFTER
from otaguard.server.storage.db import Database
from tests.campaign_fleet import token
from tests.cluster import nodes, own_pg
from tests.pg import fleet_ca, server_tls  # noqa: F401

CHECKIN = {"version": "1.0.0"}


def test_node_survives_losing_its_database(
    fleet_ca: FleetCA, server_tls: Path, tmp_path: Path
) -> None:
    with own_pg(tmp_path) as pg:
        db = Database(pg.url())
        db.upgrade()
        e = enroll_device(
            fleet_ca, db, serial="SN-DB1", model="gw", hw_rev="r1", groups=[],
            out_dir=tmp_path / "dev",
        )  # fmt: skip
        viewer = token(db, "viewer")
        db.dispose()
        ctx = ssl.create_default_context(cafile=str(e.ca_path))
        ctx.load_cert_chain(str(e.cert_path), str(e.key_path))
        with (
            nodes(1, tmp_path, server_tls, pg.url()) as (node,),
            httpx.Client(base_url=node.dev_url, verify=ctx, timeout=10) as dev,
            node.admin(viewer) as adm,
        ):
            assert dev.post("/v1/checkin", json=CHECKIN).status_code == 200
            assert dev.get("/healthz").status_code == 200

            pg.stop()
            for _ in range(2):  # the first use of a dead pooled connection, and the next
                r = dev.post("/v1/checkin", json=CHECKIN)
                assert r.status_code == 503, r.text
                assert r.json()["error"] == "E_DATABASE"
                assert int(r.headers["retry-after"]) >= 1
            r = dev.post("/v1/reports", json={"report_id": "r-1", "state": "downloading"})
            assert r.status_code == 503 and r.json()["error"] == "E_DATABASE"
            r = adm.get("/admin/v1/campaigns")
            assert r.status_code == 503 and r.json()["error"] == "E_DATABASE", r.text
            h = dev.get("/healthz")
            assert h.status_code == 503 and h.json()["checks"]["database"] == "failed"

            pg.start()
            restarted = time.time()
            ok = None
            for _ in range(50):  # the device retries as Retry-After tells it
                ok = dev.post("/v1/checkin", json=CHECKIN)
                if ok.status_code == 200:
                    break
                assert ok.json()["error"] == "E_DATABASE"
                time.sleep(0.1)
            assert ok is not None and ok.status_code == 200, ok.text if ok else None
            assert dev.get("/healthz").status_code == 200
            r = dev.post("/v1/reports", json={"report_id": "r-1", "state": "downloading"})
            assert r.status_code == 201, r.text
            assert adm.get("/admin/v1/campaigns").status_code == 200
            # The shared limiter is back on the database too (after its 1 s local fallback).
            time.sleep(RETRY_SHARED_AFTER + 0.1)
            assert dev.post("/v1/checkin", json=CHECKIN).status_code == 200
            db = Database(pg.url())
            with db.read() as conn:
                at = conn.execute(
                    text("SELECT at FROM rate_buckets WHERE key = 'SN-DB1'")
                ).scalar_one()
            db.dispose()
            assert at >= restarted
            assert node.proc is not None and node.proc.poll() is None  # never restarted
