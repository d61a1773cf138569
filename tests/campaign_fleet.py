"""A small fleet of real simulated devices against a real mTLS server, for the campaign suites.

Each device is a :class:`~otaguard.device.device.Device` provisioned by a :class:`Lab`, with
its own enrolled client certificate, talking :class:`HttpsTransport` and driven by the device
:class:`~otaguard.device.updater.Updater` (check-in → key list → install → reboot → self-test
→ confirm/revert → report).
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from otaguard.adminclient import AdminClient
from otaguard.device.bootloader import BootResult
from otaguard.device.device import Device
from otaguard.device.https_transport import HttpsTransport
from otaguard.device.lab import Lab, image_bytes
from otaguard.device.updater import PollResult, Updater
from otaguard.server.pki.enroll import Enrollment
from otaguard.server.storage import store
from otaguard.server.storage.db import Database

FACTORY = image_bytes(16_000, 1)


class RecordingTransport(HttpsTransport):
    """Remembers every report the server acknowledged (and can run a hook after one)."""

    def __init__(self, *a: Any, acked: list[tuple[str, str]], **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.acked = acked
        self.after_report: Callable[[dict[str, Any]], None] | None = None
        self.serial = ""

    def report(self, event: dict[str, Any]) -> None:
        body = dict(event)
        body.setdefault("report_id", os.urandom(8).hex())
        super().report(body)  # raises unless the server acknowledged it
        self.acked.append((self.serial, body["report_id"]))
        if self.after_report is not None:
            self.after_report(body)


@dataclass
class SimDevice:
    serial: str
    device: Device
    updater: Updater
    enrollment: Enrollment
    results: list[PollResult] = field(default_factory=list)

    def poll(self) -> PollResult:
        r = self.updater.poll_once()
        self.results.append(r)
        return r

    @property
    def version(self) -> str:
        return self.updater.facts()["version"]


def token(db: Database, role: str) -> str:
    with db.write() as conn:
        return store.create_token(conn, f"{role}-{os.urandom(4).hex()}", role)


class Fleet:
    def __init__(
        self,
        lab: Lab,
        db: Database,
        enroll: Callable[[str], Enrollment],
        url: str,
        tmp: Path,
    ) -> None:
        self.lab = lab
        self.db = db
        self._enroll = enroll
        self.url = url
        self.tmp = tmp
        self.devices: dict[str, SimDevice] = {}
        self.acked: list[tuple[str, str]] = []
        self.self_test: dict[str, bool] = {}

    def transport(self, serial: str, e: Enrollment) -> RecordingTransport:
        t = RecordingTransport(
            self.url,
            ca_file=e.ca_path,
            cert_file=e.cert_path,
            key_file=e.key_path,
            sleep=lambda _s: None,
            rng=random.Random(1),
            max_attempts=2,
            acked=self.acked,
        )
        t.serial = serial
        return t

    def add(self, serial: str, *, healthy: bool = True) -> SimDevice:
        e = self._enroll(serial)
        dev = self.lab.provision(self.tmp / "flash" / serial, FACTORY, version="1.0.0")
        self.self_test[serial] = healthy

        def test(_b: BootResult) -> bool:
            return self.self_test[serial]

        up = Updater(dev, self.transport(serial, e), self_test=test)
        sd = SimDevice(serial, dev, up, e)
        self.devices[serial] = sd
        return sd

    def reconnect(self, url: str) -> None:
        """New transports (the server came back on another port)."""
        self.url = url
        for sd in self.devices.values():
            old = sd.updater.transport
            assert isinstance(old, HttpsTransport)
            old.close()
            sd.updater.transport = self.transport(sd.serial, sd.enrollment)

    def poll_all(self) -> dict[str, PollResult]:
        return {s: d.poll() for s, d in sorted(self.devices.items())}

    def versions(self) -> dict[str, str]:
        return {s: d.version for s, d in sorted(self.devices.items())}

    def close(self) -> None:
        for sd in self.devices.values():
            t = sd.updater.transport
            if isinstance(t, HttpsTransport):
                t.close()
            sd.device.close()


def release(
    admin: httpx.Client, lab: Lab, version: str, seq: int, *, min_version: str | None = None
) -> int:
    """Upload and register a release through the typed admin client (``admin`` carries the
    release manager's token)."""
    c = AdminClient(admin)
    image = image_bytes(16_000, seq * 7919)
    blob = c.upload_blob(image)["blob"]
    env = lab.release(image, version=version, seq=seq, counter=1, min_version=min_version)
    return c.create_release(env, blob)["id"]
