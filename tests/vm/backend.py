"""The host side of the VM tests: a real update server on 127.0.0.1 (mTLS, SQLite), a
throttling TCP relay between the guest's forwarded port and the server, releases of real
slot images signed like any release, and a provisioned data partition for the guest.

The guest reaches only 10.0.2.100:8443 (QEMU user networking, ``restrict=on``, guestfwd to
the relay's loopback port); the server certificate carries that address as an IP SAN and the
agent pins its SPKI.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

import otaguard
from otaguard.adminclient import AdminClient
from otaguard.delta import create_patch
from otaguard.device.lab import Lab
from otaguard.device.linux.grubenv import decode_block
from otaguard.server.app import UpdateServer
from otaguard.server.context import ServerSettings, TrustState
from otaguard.server.pki.ca import FleetCA
from otaguard.server.pki.enroll import Enrollment, enroll_device, issue_server_cert
from otaguard.server.pki.mtls import ThreadedServer, server_ssl_context
from otaguard.server.ratelimit import RateLimit
from otaguard.server.storage import models as m
from otaguard.server.storage import store
from otaguard.server.storage.blobs import LocalBlobStore
from otaguard.server.storage.db import Database, sqlite_url
from otaguard.trust.model import StaticKeys

from . import build, ubootvm

GUEST_SERVER = "10.0.2.100"
GUEST_PORT = 8443
SERIAL = "HVAC-VM-0001"
MODEL, HW_REV = "ctl-9", "rev-b"


class Relay:
    """A TCP relay 127.0.0.1:port -> 127.0.0.1:target; server-to-guest bytes are paced at
    ``rate`` bytes/s when set (a slow link, so a power cut can land mid-download)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.rate: float | None = None
        self.sent = 0  # bytes relayed server -> guest
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=10)
            except OSError:
                client.close()
                continue
            for a, b, pace in ((client, upstream, False), (upstream, client, True)):
                threading.Thread(target=self._pipe, args=(a, b, pace), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, pace: bool) -> None:
        try:
            while True:
                data = src.recv(16384)
                if not data:
                    break
                dst.sendall(data)
                if pace:
                    self.sent += len(data)
                if pace and self.rate:
                    time.sleep(len(data) / self.rate)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()

    def close(self) -> None:
        self._stop.set()
        self.sock.close()


def spki_pin(cert_pem: bytes) -> str:
    cert = x509.load_pem_x509_certificate(cert_pem)
    spki = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


@dataclass
class Release:
    version: str
    image: Path
    manifest: bytes
    release_id: int
    deltas: dict[str, bytes] = field(default_factory=dict)


class Backend:
    """Server + CA + signing lab for one test."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.lab = Lab(model=MODEL, hw_rev=HW_REV, now=int(time.time()))
        self.ca = FleetCA.create(tmp / "ca", passphrase=b"vm-test-ca")
        tls = tmp / "tls"
        issue_server_cert(
            self.ca, tls, dns_names=["localhost"], ip_addresses=["127.0.0.1", GUEST_SERVER]
        )
        (tls / "ca.pem").write_bytes(self.ca.cert.public_bytes(serialization.Encoding.PEM))
        self.tls = tls
        self.db = Database(sqlite_url(tmp / "otaguard.db"))
        self.db.upgrade()
        settings = ServerSettings(
            ca_cert=self.ca.cert,
            device_rate=RateLimit(rate=100.0, burst=100),
            poll_interval=4,
        )
        self.srv = UpdateServer(
            self.db,
            LocalBlobStore(tmp / "blobs"),
            settings,
            TrustState(StaticKeys([self.lab.op.public_key])),
        )
        ctx = server_ssl_context(tls / "server.pem", tls / "server.key", tls / "ca.pem")
        self.server = ThreadedServer(self.srv.asgi("device"), ctx).start()
        adm = server_ssl_context(
            tls / "server.pem", tls / "server.key", None, require_client_cert=False
        )
        self.admin_server = ThreadedServer(self.srv.asgi("admin"), adm).start()
        self.relay = Relay(self.server.port)
        with self.db.write() as conn:
            token = store.create_token(conn, "vm-admin", "security-officer")
        self.admin = AdminClient.connect(
            self.admin_server.url, token=token, ca_file=tls / "ca.pem", timeout=60
        )
        self.enrollment: Enrollment = enroll_device(
            self.ca,
            self.db,
            serial=SERIAL,
            model=MODEL,
            hw_rev=HW_REV,
            groups=["vm"],
            out_dir=tmp / "device-id",
        )
        self.releases: dict[str, Release] = {}
        self._seq = 0

    def close(self) -> None:
        self.admin.close()
        self.relay.close()
        self.server.stop()
        self.admin_server.stop()
        self.db.dispose()

    # --- releases ---------------------------------------------------------------------------
    def sign(self, image: Path, version: str, counter: int, **kw: Any) -> bytes:
        self._seq += 1
        digest = hashlib.sha256(image.read_bytes()).digest()
        return self.lab.release(
            (digest, image.stat().st_size), version=version, seq=self._seq, counter=counter, **kw
        )

    def publish(
        self, version: str, image: Path, *, counter: int, delta_from: str | None = None
    ) -> Release:
        manifest = self.sign(image, version, counter)
        blob = self.admin.upload_blob(image)["blob"]
        rel = Release(version, image, manifest, self.admin.create_release(manifest, blob)["id"])
        if delta_from is not None:
            base = self.releases[delta_from]
            patch = create_patch(base.image.read_bytes(), image.read_bytes())
            dmf = self.lab.delta_release(
                base.image.read_bytes(), image.read_bytes(), patch,
                version=version, seq=self._seq, counter=counter,
            )  # fmt: skip
            pblob = self.admin.upload_blob(patch)["blob"]
            self.admin.create_delta(rel.release_id, dmf, pblob, base_version=delta_from)
            rel.deltas[delta_from] = patch
        self.releases[version] = rel
        return rel

    def campaign(self, name: str, release: Release) -> None:
        spec = {
            "id": name,
            "release_id": release.release_id,
            "selector": {"model": MODEL},
            "phases": [{"fraction": 1.0}],
            "success_threshold": 1.0,
            "min_soak_s": 0,
            "failure": {"max_failed": 1, "min_finished": 1},
            "deadline": int(time.time()) + 86400,
        }
        self.admin.create_campaign(spec)
        self.admin.campaign_action(name, "start")

    def assign(self, release: Release) -> None:
        self.admin.assign(SERIAL, release.release_id)

    def campaign_status(self, name: str) -> dict[str, Any]:
        return dict(self.admin.campaign(name))

    def device(self) -> dict[str, Any]:
        return dict(self.admin.device(SERIAL))

    def reports(self) -> list[dict[str, Any]]:
        with self.db.read() as conn:
            row = store.device_by_serial(conn, SERIAL)
            assert row is not None
            rows = conn.execute(
                m.status_reports.select()
                .where(m.status_reports.c.device_id == row.id)
                .order_by(m.status_reports.c.id)
            ).all()
            return [dict(r._mapping) for r in rows]


GRUB_SECTION = 'grubenv = ["/srv/otaguard/grubenv.0", "/srv/otaguard/grubenv.1"]'
UBOOT_SECTION = 'type = "uboot"\nfw_env_config = "/mnt/fw_env.config"'


def agent_config(pin: str, *, max_tries: int = 2, bootloader: str = GRUB_SECTION) -> str:
    return f"""\
[server]
url = "https://{GUEST_SERVER}:{GUEST_PORT}"
spki_pins = ["{pin}"]
ca = "/mnt/otaguard/server-ca.pem"
poll_interval = 4
poll_jitter = 0.0
timeout = 60

[device]
state_dir = "/mnt/otaguard"
run_dir = "/run/otaguard"
slot_a = "PARTLABEL=rootfs-a"
slot_b = "PARTLABEL=rootfs-b"
max_tries = {max_tries}
checkpoint = 1048576

[bootloader]
{bootloader}

[self_test]
commands = [["/media/usr/lib/otaguard/self-test"]]
timeout = 60

[system]
reboot = ["/bin/busybox", "reboot", "-f"]
"""


def otaguard_bin() -> Path:
    return Path(sys.executable).parent / "otaguard"


def provision_disk(
    be: Backend, out: Path, factory: Release, *, max_tries: int = 2, uboot: bool = False
) -> Path:
    """Factory: ``agent provision`` (the real CLI) into a data-partition tree, then the disk.
    ``uboot``: U-Boot's boot partition and env (tests/vm/ubootvm.py) instead of GRUB's."""
    work = out.parent / f"{out.name}.factory"
    shutil.rmtree(work, ignore_errors=True)
    data = work / "data"
    (data / "otaguard").mkdir(parents=True)
    pin = spki_pin((be.tls / "server.pem").read_bytes())
    section = UBOOT_SECTION if uboot else GRUB_SECTION
    (data / "agent.toml").write_text(agent_config(pin, max_tries=max_tries, bootloader=section))
    # The guest runs the agent from the package this test imported (a worktree's src/ comes
    # before the venv's own install), through a wrapper on the data partition (/mnt).
    src = Path(otaguard.__file__).resolve().parents[1]
    wrapper = data / "otaguard.sh"
    wrapper.write_text(f'#!/bin/sh\nPYTHONPATH={src} exec {otaguard_bin()} "$@"\n')
    wrapper.chmod(0o755)
    (data / "boot.env").write_text(
        "OTAGUARD_BIN=/mnt/otaguard.sh\nOTAGUARD_CONFIG=/mnt/agent.toml\n"
    )
    slot_a = work / "slot-a.img"
    shutil.copyfile(factory.image, slot_a)
    slot_b = work / "slot-b.img"
    with slot_b.open("wb") as f:
        f.truncate(build.slot_partition_size())
    (work / "factory.suit").write_bytes(factory.manifest)
    (work / "trust.bundle").write_bytes(be.lab.bundle.to_bytes())
    env0, env1 = work / "grubenv.0", work / "grubenv.1"
    e = be.enrollment
    assert e.key_path is not None
    argv = [
        str(otaguard_bin()), "agent", "provision", "--config", str(data / "agent.toml"),
        "--trust", str(work / "trust.bundle"), "--vendor", "hvac.example.com",
        "--model", MODEL, "--hw-rev", HW_REV,
        "--factory-image", str(factory.image), "--factory-manifest", str(work / "factory.suit"),
        "--identity-key", str(e.key_path), "--identity-cert", str(e.cert_path),
        "--server-ca", str(be.tls / "ca.pem"), "--state-dir", str(data / "otaguard"),
        "--slot-a", str(slot_a), "--slot-b", str(slot_b), "--grubenv", str(env0), str(env1),
    ]  # fmt: skip
    if uboot:
        # the factory writes the env with fw_setenv into a file laid out like the disk's start
        (data / "fw_env.config").write_text(ubootvm.fw_env_config(ubootvm.GUEST_DISK))
        start = work / "disk-start.img"
        with start.open("wb") as f:
            f.truncate(build.FIRST_LBA * build.SECTOR)
        (work / "fw_env.config").write_text(ubootvm.fw_env_config(start))
        argv += ["--fw-env-config", str(work / "fw_env.config")]
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr
    if uboot:
        return ubootvm.disk(
            out, slot_a=slot_a, slot_b=None, data_dir=data, env=ubootvm.read_copies(start)
        )
    env = decode_block(env0.read_bytes())
    env.pop("OG_VALID", None)
    disk = build.disk(out, slot_a=slot_a, slot_b=None, data_dir=data, env=env)
    for i, p in enumerate((env0, env1)):
        build.esp_write(disk, f"/otaguard/grubenv.{i}", p.read_bytes())
    return disk


@contextlib.contextmanager
def backend(tmp: Path) -> Iterator[Backend]:
    be = Backend(tmp)
    try:
        yield be
    finally:
        be.close()


def env_of(disk: Path) -> dict[str, str]:
    return build.read_env(disk, 0)


def quiet_environ() -> dict[str, str]:
    return dict(os.environ)
