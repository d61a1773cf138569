"""A real cluster: three ``otaguard server run`` nodes on one PostgreSQL, haproxy in front of
their device listeners in TLS pass-through (mTLS ends at the nodes), the S3 server (moto) as
their one blob store, and simulated devices (the campaign suites' real devices: flash,
bootloader, updater) talking to the balancer.

During a running campaign node 2 is SIGKILLed and later restarted. Asserted: the devices
carry on through the other nodes and all reach the release; every acknowledged report is in
the database once; no device was offered anything it had to refuse; the campaign's counters
equal its devices' states; a device hammering all three nodes gets its per-device limit once,
not three times, and its refusals are counted cluster-wide (flagged although no single node
saw the threshold); and a key list published through node 1 is honoured by node 3 — the
campaign's release is signed by the key that list adds, uploaded through node 3.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import ssl
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import func, select

from otaguard.adminclient import AdminClient
from otaguard.crypto.software import SoftwareSigner, generate_private_key
from otaguard.device.lab import Lab, image_bytes
from otaguard.server.pki.ca import FleetCA
from otaguard.server.pki.enroll import Enrollment, enroll_device
from otaguard.server.storage import models as m
from otaguard.server.storage.db import Database
from tests.campaign_fleet import Fleet, token
from tests.cluster import haproxy, nodes, s3_blobs
from tests.pg import PgCluster, fleet_ca, pg_cluster, server_tls  # noqa: F401
from tests.s3server import MotoServer, moto_server, s3_env  # noqa: F401

N_DEVICES = 6
RATE, BURST = 0.1, 60  # per device, on every node (the fleet needs < 30 requests each)
PROBE_THRESHOLD = 20  # the server's default: rate-limit refusals that flag an identity


def _acked_in_db(db: Database) -> list[tuple[str, str]]:
    with db.read() as conn:
        rows = conn.execute(
            select(m.devices.c.serial, m.status_reports.c.report_id).select_from(
                m.status_reports.join(m.devices, m.devices.c.id == m.status_reports.c.device_id)
            )
        ).all()
    return [(r.serial, r.report_id) for r in rows]


def _hammer(urls: list[str], e: Enrollment, rounds: int) -> tuple[int, int]:
    """Check in round-robin on every node's own device listener: (allowed, refused)."""
    ctx = ssl.create_default_context(cafile=str(e.ca_path))
    ctx.load_cert_chain(str(e.cert_path), str(e.key_path))
    clients = [httpx.Client(base_url=u, verify=ctx, timeout=10) for u in urls]
    status: Counter[int] = Counter()
    try:
        for _ in range(rounds):
            for c in clients:
                status[c.post("/v1/checkin", json={"version": "1.0.0"}).status_code] += 1
    finally:
        for c in clients:
            c.close()
    assert set(status) <= {200, 429}, status
    return status[200], status[429]


def test_three_nodes_behind_haproxy_survive_a_sigkill(
    pg_cluster: PgCluster,
    fleet_ca: FleetCA,
    server_tls: Path,
    tmp_path: Path,
    moto_server: MotoServer,
    s3_env: dict[str, str],
) -> None:
    url = pg_cluster.create_database()
    db = Database(url)
    db.upgrade()
    lab = Lab()
    bundle = tmp_path / "bundle.cbor"
    bundle.write_bytes(lab.bundle.to_bytes())
    enrolled: dict[str, Enrollment] = {}
    for i in range(N_DEVICES):
        s = f"SN-C{i}"
        enrolled[s] = enroll_device(
            fleet_ca, db, serial=s, model=lab.model, hw_rev=lab.hw_rev, groups=[],
            out_dir=tmp_path / "certs" / s,
        )  # fmt: skip
    hammerer = enroll_device(  # another model: not in the campaign
        fleet_ca, db, serial="SN-HAMMER", model="other", hw_rev="r1", groups=[],
        out_dir=tmp_path / "certs" / "hammer",
    )  # fmt: skip
    officer, rm, op = (token(db, r) for r in ("security-officer", "release-manager", "operator"))
    extra = (
        *("--trust-bundle", str(bundle)),
        *("--device-rate", str(RATE), "--device-burst", str(BURST)),
        # Every device connection reaches the nodes from haproxy's address (TLS
        # pass-through, no PROXY protocol): the per-IP limit is the balancer's job.
        *("--ip-rate", "100000", "--ip-burst", "100000"),
    )
    new_key = SoftwareSigner(generate_private_key("ed25519"))
    blobs = s3_blobs(moto_server)  # one bucket for all nodes (the S3 server, moto)
    with (
        nodes(3, tmp_path, server_tls, url, *extra, blobs=blobs) as cluster,
        haproxy(tmp_path, cluster) as lb,
    ):
        n1, n2, n3 = cluster
        fleet = Fleet(lab, db, enrolled.__getitem__, lb.url, tmp_path)
        results: list[Any] = []
        try:
            for s in enrolled:
                fleet.add(s)
            results += fleet.poll_all().values()

            # A key list adding a key, published through node 1; a release signed by that
            # key only, uploaded through node 3; the campaign created through node 2.
            with n1.admin(officer) as off:
                r = off.put("/admin/v1/keylist", content=lab.keylist_update([new_key]))
                assert r.status_code == 201, r.text
            with n3.admin(rm) as rm3:
                c = AdminClient(rm3)
                image = image_bytes(16_000, 4242)
                blob = c.upload_blob(image)["blob"]
                env = lab.release(image, version="1.1.0", seq=2, counter=1, signers=[new_key])
                rid = c.create_release(env, blob)["id"]
            with n2.admin(op) as op2:
                spec = {
                    "id": "cluster-1",
                    "release_id": rid,
                    "selector": {"model": lab.model},
                    "phases": [{"fraction": 0.5}, {"fraction": 1.0}],
                    "success_threshold": "all_finished",
                }
                AdminClient(op2).create_campaign(spec)
                assert AdminClient(op2).campaign_action("cluster-1", "start")["status"] == "running"

            # SIGKILL node 2 right after the second acknowledged "installed" report.
            installed: list[str] = []

            def kill_node2(body: dict[str, Any]) -> None:
                if body.get("event") == "installed":
                    installed.append(body["report_id"])
                    if len(installed) == 2:
                        n2.kill()

            for sd in fleet.devices.values():
                sd.updater.transport.after_report = kill_node2  # type: ignore[attr-defined]
            for _ in range(4):  # key list first, then the release (phase 1: half the fleet)
                results += fleet.poll_all().values()
                if len(installed) >= 2:
                    break
            assert n2.proc is not None and n2.proc.returncode is not None, Counter(
                r.outcome for r in results
            )  # it was killed mid-campaign
            for sd in fleet.devices.values():
                sd.updater.transport.after_report = None  # type: ignore[attr-defined]
            results += fleet.poll_all().values()  # on nodes 1 and 3 only

            # The per-device limit holds across the live nodes (and, below, all three).
            t_hammer = time.monotonic()
            ok, refused = _hammer([n1.dev_url, n3.dev_url], hammerer, 10)
            assert ok == 20 and refused == 0  # within the burst

            n2.start()  # same ports: haproxy's health check takes it back
            ok2, refused2 = _hammer([n.dev_url for n in cluster], hammerer, 24)
            refill = RATE * (time.monotonic() - t_hammer)  # tokens added meanwhile
            # 20 + 72 requests against one bucket of 60 (+0.1/s): per-node buckets would
            # have let all 92 through.
            assert ok + ok2 <= BURST + refill, (ok, ok2, refill)
            assert refused2 >= 92 - BURST - refill
            # No node saw PROBE_THRESHOLD refusals, the cluster did: the identity is flagged.
            assert refused2 >= PROBE_THRESHOLD and refused2 / 3 < PROBE_THRESHOLD
            with db.read() as conn:
                flagged = conn.execute(
                    select(m.devices.c.suspect).where(m.devices.c.serial == hammerer.serial)
                ).scalar_one()
            assert flagged

            with n2.admin(op) as op2:
                st: dict[str, Any] = {}
                for _ in range(6):
                    results += fleet.poll_all().values()
                    st = AdminClient(op2).campaign("cluster-1")
                    if st["status"] == "completed":
                        break
                assert st["status"] == "completed", st
        finally:
            fleet.close()

        # Everyone is on the release, every acknowledged report is stored exactly once.
        assert set(fleet.versions().values()) == {"1.1.0"}
        in_db = _acked_in_db(db)
        assert len(in_db) == len(set(in_db))
        assert set(fleet.acked) <= set(in_db)
        # Nothing a device had to refuse: no verification failure, no refused key list.
        outcomes = Counter(r.outcome for r in results)
        assert set(outcomes) <= {"idle", "keylist", "confirmed", "unreachable"}, outcomes
        assert all(r.keylist_error is None for r in results)
        assert outcomes["confirmed"] == N_DEVICES
        # The campaign's counters are its devices' states, each device counted once.
        assert st["counts"]["succeeded"] == N_DEVICES
        assert sum(st["counts"].values()) == N_DEVICES
        with db.read() as conn:
            states = dict(
                conn.execute(
                    select(m.campaign_devices.c.state, func.count()).group_by(
                        m.campaign_devices.c.state
                    )
                ).all()
            )
        assert states == {"succeeded": N_DEVICES}
        # Node 2 serves again after its restart (directly, and behind the balancer).
        assert n2.proc is not None and n2.proc.poll() is None
        # The blobs (image, envelope) are in the one bucket, not on any node's disk.
        keys = moto_server.client().list_objects_v2(Bucket=blobs.bucket).get("Contents", [])
        assert len(keys) >= 2
        assert not any((n.data / "blobs").exists() for n in cluster)
    db.dispose()
