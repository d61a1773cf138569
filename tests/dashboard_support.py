"""A fleet scene for the dashboard suites: a real server (TLS admin listener, mTLS device
listener, SQLite), real simulated devices, a release, a running campaign and tools to start a
key rotation, plus logging in to ``/ui/`` the way a browser does (form token, session cookie).

Server time (store timestamps, campaign engine) is one SimClock, as in the rotation incident
suite, so the charts' time axes agree.
"""

from __future__ import annotations

import base64
import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from otaguard.clock import SimClock
from otaguard.crypto.software import SoftwareSigner, generate_private_key
from otaguard.device.lab import Lab
from otaguard.server.context import ServerSettings, TrustState
from otaguard.server.pki.ca import FleetCA
from otaguard.server.ratelimit import RateLimit
from otaguard.server.storage import store
from otaguard.server.storage.db import sqlite_url
from tests.campaign_fleet import Fleet, release
from tests.pg import Harness, harness

CSRF_RE = re.compile(r'name="csrf" value="([^"]+)"')


@dataclass
class Scene:
    h: Harness
    fleet: Fleet
    lab: Lab
    clock: SimClock
    tokens: dict[str, str] = field(default_factory=dict)

    @property
    def url(self) -> str:
        assert self.h.admin_server is not None
        return self.h.admin_server.url

    def token(self, role: str) -> str:
        if role not in self.tokens:
            with self.h.db.write() as conn:
                name = f"{role}-{os.urandom(3).hex()}"
                self.tokens[role] = store.create_token(conn, name, role)
        return self.tokens[role]

    def api(self, role: str) -> httpx.Client:
        return self.h.client(None, headers={"Authorization": f"Bearer {self.token(role)}"})

    def browser(self) -> httpx.Client:
        """A cookie-keeping client of the admin listener, logged in to nothing yet."""
        return self.h.client(None, follow_redirects=False)

    def login(self, role: str, token: str | None = None) -> httpx.Client:
        c = self.browser()
        r = login(c, token or self.token(role))
        assert r.status_code == 303, r.text
        return c

    def campaign(
        self, name: str, *, display: str | None = None, version: str = "1.1.0", seq: int = 2
    ) -> int:
        rm, op = self.api("release-manager"), self.api("operator")
        rid = release(rm, self.lab, version, seq)
        spec: dict[str, Any] = {
            "id": name,
            "release_id": rid,
            "selector": {"model": self.lab.model},
            "phases": [{"fraction": 0.5}, {"fraction": 1.0}],
            "failure": {"max_failed": 3, "min_finished": 1},
        }
        if display is not None:
            spec["name"] = display
        r = op.post("/admin/v1/campaigns", json=spec)
        assert r.status_code == 201, r.text
        r = op.post(f"/admin/v1/campaigns/{name}/start")
        assert r.status_code == 200, r.text
        return rid

    def start_rotation(self) -> SoftwareSigner:
        key_b = SoftwareSigner(generate_private_key("ed25519"))
        doc = self.lab.keylist_update([key_b])
        body = {
            "keylist": base64.b64encode(doc).decode(),
            "old_kid": self.lab.op.public_key.key_id.hex(),
            "new_kid": key_b.public_key.key_id.hex(),
            "threshold": 0.75,
            "unreachable_after": 3600,
            "reason": "INC-42: key A suspected compromised",
        }
        r = self.api("security-officer").post("/admin/v1/rotations", json=body)
        assert r.status_code == 201, r.text
        return key_b


def csrf_of(html: str) -> str:
    m = CSRF_RE.search(html)
    assert m is not None, html[:500]
    return m.group(1)


def login(c: httpx.Client, token: str) -> httpx.Response:
    page = c.get("/ui/login")
    return c.post("/ui/login", data={"token": token, "csrf": csrf_of(page.text)})


@contextlib.contextmanager
def scene(
    fleet_ca: FleetCA,
    server_tls: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    *,
    devices: int = 6,
    healthy: bool = True,
    db_url: str | None = None,
) -> Iterator[Scene]:
    lab = Lab()
    clock = SimClock(lab.now)
    monkeypatch.setattr(store, "now_s", lambda: int(clock.now()))
    settings = ServerSettings(
        ca_cert=fleet_ca.cert,
        device_rate=RateLimit(rate=1000.0, burst=1000),
        ip_rate=RateLimit(rate=10000.0, burst=10000),
        audit_sealer=SoftwareSigner(generate_private_key("ed25519")),
    )
    trust = TrustState(lab.bundle.store())
    url = db_url or sqlite_url(tmp_path / "otaguard.db")
    with harness(url, fleet_ca, server_tls, tmp_path, trust=trust, settings=settings) as h:
        h.srv.campaigns.clock = clock
        fleet = Fleet(
            lab, h.db, lambda s: h.enroll(s, model=lab.model, hw_rev=lab.hw_rev), h.url, tmp_path
        )
        try:
            for i in range(devices):
                fleet.add(f"SN-{i:03d}", healthy=healthy)
            fleet.poll_all()  # in service before the release: the server knows what runs
            yield Scene(h, fleet, lab, clock)
        finally:
            fleet.close()
