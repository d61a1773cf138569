"""``otaguard server run --workers N``: one node whose device listener is served by N processes
on PostgreSQL (server/workers.py), run as a real subprocess.

Asserted: the workers answer devices on their own (with the first process stopped); a
device gets its per-device limit once across the node's processes, not once per process;
the first process's ``/metrics`` counts every process's check-ins; a worker that dies stops
the node (non-zero exit, said in the log) and a first process that dies takes its workers
with it; on SQLite ``--workers 2`` is refused before anything listens.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import os
import signal
import ssl
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from otaguard.server.metrics import parse_samples
from otaguard.server.pki.ca import FleetCA
from otaguard.server.pki.enroll import Enrollment, enroll_device
from otaguard.server.storage.db import Database
from tests.campaign_fleet import token
from tests.cluster import Node, nodes
from tests.pg import PgCluster, fleet_ca, pg_cluster, server_tls  # noqa: F401
from tests.support import server_run_argv

WORKERS = 3
RATE, BURST = 0.1, 20


def _children(pid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                out.append(int(d))
    return sorted(out)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _checkins(node: Node, e: Enrollment, n: int) -> Counter[int]:
    """``n`` check-ins, each on a new connection (so any process of the node may take it)."""
    ctx = ssl.create_default_context(cafile=str(e.ca_path))
    ctx.load_cert_chain(str(e.cert_path), str(e.key_path))
    status: Counter[int] = Counter()
    for _ in range(n):
        with httpx.Client(base_url=node.dev_url, verify=ctx, timeout=10) as c:
            status[c.post("/v1/checkin", json={"version": "1.0.0"}).status_code] += 1
    return status


@pytest.fixture
def node_setup(
    pg_cluster: PgCluster, fleet_ca: FleetCA, server_tls: Path, tmp_path: Path
) -> Iterator[tuple[Node, dict[str, Enrollment], str]]:
    url = pg_cluster.create_database()
    db = Database(url)
    db.upgrade()
    enrolled = {
        s: enroll_device(
            fleet_ca, db, serial=s, model="gw", hw_rev="r1", groups=[],
            out_dir=tmp_path / "certs" / s,
        )
        for s in ("SN-W1", "SN-W2", "SN-HAMMER")
    }  # fmt: skip
    viewer = token(db, "viewer")
    db.dispose()
    extra = (
        *("--workers", str(WORKERS)),
        *("--device-rate", str(RATE), "--device-burst", str(BURST)),
        *("--ip-rate", "100000", "--ip-burst", "100000"),
    )
    with nodes(1, tmp_path, server_tls, url, *extra) as (node,):
        yield node, enrolled, viewer


def test_workers_serve_share_limits_and_count_in_metrics(
    node_setup: tuple[Node, dict[str, Enrollment], str],
) -> None:
    node, enrolled, viewer = node_setup
    assert node.proc is not None
    first = node.proc.pid
    workers = _children(first)
    assert len(workers) == WORKERS - 1, workers

    # The workers answer on their own: the first process is stopped meanwhile.
    os.kill(first, signal.SIGSTOP)
    try:
        assert _checkins(node, enrolled["SN-W1"], 6) == Counter({200: 6})
    finally:
        os.kill(first, signal.SIGCONT)
    assert _checkins(node, enrolled["SN-W2"], 6) == Counter({200: 6})

    # One per-device limit for the node, not one per process.
    t0 = time.monotonic()
    hammer = _checkins(node, enrolled["SN-HAMMER"], 2 * BURST + 10)
    refill = RATE * (time.monotonic() - t0)
    assert set(hammer) == {200, 429}, hammer
    assert BURST <= hammer[200] <= BURST + refill + 1, hammer
    total = 12 + hammer[200]

    # /metrics in the first process counts every process's check-ins (workers report every
    # second) and the refusals they answered.
    with node.admin(viewer) as adm:
        deadline = time.monotonic() + 10
        while True:
            r = adm.get("/metrics")
            assert r.status_code == 200
            samples = parse_samples(r.text)
            seen = samples.get("otaguard_checkins_total", 0)
            refused = samples.get('otaguard_refusals_total{code="E_RATE_LIMIT",listener="device"}')
            if (seen, refused) == (total, hammer[429]) or time.monotonic() > deadline:
                break
            time.sleep(0.3)
    assert (seen, refused) == (total, hammer[429]), r.text[:3000]

    # A worker that dies stops the node: non-zero exit, said in the log, no worker left over.
    os.kill(workers[0], signal.SIGKILL)
    assert node.proc.wait(timeout=20) != 0
    assert "device worker" in node.log_text() and "this node stopped" in node.log_text()
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)


def test_a_killed_first_process_takes_its_workers_along(
    node_setup: tuple[Node, dict[str, Enrollment], str],
) -> None:
    node, _enrolled, _viewer = node_setup
    assert node.proc is not None
    workers = _children(node.proc.pid)
    assert len(workers) == WORKERS - 1
    node.kill()  # SIGKILL: no shutdown code runs in the first process
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)


def test_workers_need_postgresql(server_tls: Path, tmp_path: Path) -> None:
    argv = server_run_argv(tmp_path / "data", server_tls, "--workers", "2")
    env = {k: v for k, v in os.environ.items() if k != "OTAGUARD_DB_URL"}
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
    assert proc.returncode != 0
    assert "E_USAGE" in proc.stderr and "needs PostgreSQL" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "listening" not in proc.stdout


def test_ctrl_c_stops_the_node_cleanly(
    node_setup: tuple[Node, dict[str, Enrollment], str],
) -> None:
    """A terminal's Ctrl-C is a clean stop: it reaches the first process only (the workers
    are in a process group of their own), which stops its workers — the CLI's exit status
    for an interrupt, no worker counted as failed."""
    node, _enrolled, _viewer = node_setup
    assert node.proc is not None
    first = node.proc.pid
    workers = _children(first)
    assert len(workers) == WORKERS - 1
    assert all(os.getpgid(w) != os.getpgid(first) for w in workers)
    os.kill(first, signal.SIGINT)
    assert node.proc.wait(timeout=20) == 130, node.log_text()  # the CLI's "interrupted"
    assert "interrupted" in node.log_text()
    assert "this node stopped" not in node.log_text()
    deadline = time.monotonic() + 10
    while any(_alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_alive(w) for w in workers)
