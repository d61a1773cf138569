"""Trust anchors follow the database on every node: a key list published through one
``otaguard server run`` is honoured by another on the same PostgreSQL (issue #20, the
E_UNTRUSTED_KEY a second node used to answer), and a rotation advanced through one node
retires the old key on the others.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from otaguard.adminclient import AdminClient
from otaguard.crypto.software import SoftwareSigner, generate_private_key
from otaguard.device.lab import Lab, image_bytes
from otaguard.server.pki.ca import FleetCA
from otaguard.server.storage.db import Database
from tests.campaign_fleet import token
from tests.cluster import nodes
from tests.pg import PgCluster, fleet_ca, pg_cluster, server_tls  # noqa: F401


@dataclass
class Shared:
    """One PostgreSQL database both nodes will use, its trust bundle, and a new key."""

    url: str
    db: Database
    lab: Lab
    bundle: Path
    new: SoftwareSigner


@pytest.fixture
def shared(pg_cluster: PgCluster, tmp_path: Path) -> Iterator[Shared]:
    url = pg_cluster.create_database()
    db = Database(url)
    db.upgrade()
    lab = Lab()
    bundle = tmp_path / "bundle.cbor"
    bundle.write_bytes(lab.bundle.to_bytes())
    try:
        yield Shared(url, db, lab, bundle, SoftwareSigner(generate_private_key("ed25519")))
    finally:
        db.dispose()


def _upload(
    c: AdminClient, lab: Lab, signer: SoftwareSigner, version: str, seq: int
) -> httpx.Response:
    image = image_bytes(4_000, seq)
    blob = c.upload_blob(image)["blob"]
    env = lab.release(image, version=version, seq=seq, counter=1, signers=[signer])
    r = c.http.post("/admin/v1/releases", params={"image": blob}, content=env)
    return r


def test_keylist_published_on_one_node_is_honoured_by_the_other(
    shared: Shared, fleet_ca: FleetCA, server_tls: Path, tmp_path: Path
) -> None:
    lab, new = shared.lab, shared.new
    officer, rm = token(shared.db, "security-officer"), token(shared.db, "release-manager")
    with (
        nodes(2, tmp_path, server_tls, shared.url, "--trust-bundle", str(shared.bundle)) as (
            n1,
            n2,
        ),
        n1.admin(officer) as off1,
        n2.admin(rm) as rm2,
    ):
        # Before: node 2 refuses the new key, which nobody has authorized yet.
        r = _upload(AdminClient(rm2), lab, new, "1.1.0", 2)
        assert r.status_code == 400 and r.json()["error"] == "E_UNTRUSTED_KEY"
        r = off1.put("/admin/v1/keylist", content=lab.keylist_update([new]))
        assert r.status_code == 201, r.text
        # The upload decision re-reads the anchors' generation: no waiting needed.
        r = _upload(AdminClient(rm2), lab, new, "1.1.0", 2)
        assert r.status_code == 201, r.text
        # And a key list that revokes the new key, again published through node 1.
        r = off1.put(
            "/admin/v1/keylist",
            content=lab.keylist_update(revoked=[new.public_key.key_id]),
        )
        assert r.status_code == 201, r.text
        r = _upload(AdminClient(rm2), lab, new, "1.2.0", 3)
        assert r.status_code == 400, r.text
        assert r.json()["error"] in ("E_UNTRUSTED_KEY", "E_KEY_REVOKED")


def test_trust_sync_follows_notifications_without_a_request(
    shared: Shared, fleet_ca: FleetCA, server_tls: Path, tmp_path: Path
) -> None:
    """Node 2's cached anchors (what ``keys expiry`` lists) move to the new key list by
    themselves, without a request that re-reads them: LISTEN/NOTIFY (or the re-check)."""
    officer, viewer = token(shared.db, "security-officer"), token(shared.db, "viewer")
    with (
        nodes(2, tmp_path, server_tls, shared.url, "--trust-bundle", str(shared.bundle)) as (
            n1,
            n2,
        ),
        n1.admin(officer) as off1,
        n2.admin(viewer) as v2,
    ):
        kid = shared.new.public_key.key_id.hex()

        def kids() -> set[str]:
            return {k["kid"] for k in v2.get("/admin/v1/keys/expiry").json()["keys"]}

        assert kid not in kids()
        r = off1.put("/admin/v1/keylist", content=shared.lab.keylist_update([shared.new]))
        assert r.status_code == 201, r.text
        for _ in range(100):  # the notification arrives in milliseconds
            if kid in kids():
                break
            time.sleep(0.05)
        assert kid in kids()
