"""Fixtures for the server suites: a throwaway PostgreSQL cluster, the fleet CA, a running
mTLS server, and enrolled devices. Test modules import what they use (``from tests.pg import
...``); pytest registers imported fixtures in the importing module.

PostgreSQL: ``initdb`` refuses to run as root, so under root the cluster is created and run as
the ``postgres`` user in a temp dir it owns. It listens only on a unix socket inside that dir
(no TCP port to collide on), one cluster per pytest session / xdist worker, one database per
test.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import ssl
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives import serialization

from otaguard.server.app import UpdateServer
from otaguard.server.context import ServerSettings, TrustState
from otaguard.server.pki.ca import FleetCA
from otaguard.server.pki.enroll import Enrollment, enroll_device, issue_server_cert
from otaguard.server.pki.mtls import ThreadedServer, server_ssl_context
from otaguard.server.ratelimit import RateLimit
from otaguard.server.storage.blobs import BlobStore, LocalBlobStore
from otaguard.server.storage.db import Database, sqlite_url
from tests.support import missing, require_binary

CA_PASSPHRASE = b"test-ca-passphrase"


# --- PostgreSQL ----------------------------------------------------------------------------------
@dataclass
class PgCluster:
    socket_dir: Path

    def url(self, dbname: str) -> str:
        return f"postgresql+psycopg://postgres@/{dbname}?host={self.socket_dir}"

    def create_database(self) -> str:
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(
            host=str(self.socket_dir), user="postgres", dbname="postgres", autocommit=True
        ) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[PgCluster]:
    initdb = require_binary("initdb")
    pg_ctl = require_binary("pg_ctl")
    if os.geteuid() == 0:
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            missing("a 'postgres' system user to run initdb as")
            raise AssertionError("unreachable") from None
    base = Path(tempfile.mkdtemp(prefix="otaguard-pg-"))
    if os.geteuid() == 0:
        os.chown(base, pw.pw_uid, pw.pw_gid)
    data = base / "data"
    log = base / "log"
    subprocess.run(
        _as_postgres(
            [initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync"]
        ),
        check=True,
        capture_output=True,
    )
    opts = f"-k {base} -c listen_addresses='' -c fsync=off -c max_connections=200"
    subprocess.run(
        _as_postgres([pg_ctl, "-D", str(data), "-o", opts, "-l", str(log), "-w", "start"]),
        check=True,
        capture_output=True,
    )
    try:
        yield PgCluster(base)
    finally:
        subprocess.run(
            _as_postgres([pg_ctl, "-D", str(data), "-m", "immediate", "stop"]),
            capture_output=True,
        )
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "otaguard.db")
    cluster: PgCluster = request.getfixturevalue("pg_cluster")
    return cluster.create_database()


# --- CA / server / devices ---------------------------------------------------------------------
@pytest.fixture(scope="session")
def fleet_ca(tmp_path_factory: pytest.TempPathFactory) -> FleetCA:
    return FleetCA.create(tmp_path_factory.mktemp("ca") / "ca", passphrase=CA_PASSPHRASE)


@pytest.fixture(scope="session")
def server_tls(fleet_ca: FleetCA, tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("server-tls")
    issue_server_cert(fleet_ca, d, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    (d / "ca.pem").write_bytes(fleet_ca.cert.public_bytes(serialization.Encoding.PEM))
    return d


def device_context(e: Enrollment, key_path: Path | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(e.ca_path))
    ctx.load_cert_chain(str(e.cert_path), str(key_path or e.key_path))
    return ctx


@dataclass
class Harness:
    """A running server plus what tests need to talk to it."""

    srv: UpdateServer
    server: ThreadedServer
    ca: FleetCA
    db: Database
    tmp: Path
    admin_server: ThreadedServer | None = None
    clients: list[httpx.Client] = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.server.url

    def enroll(
        self, serial: str, model: str = "gw", hw_rev: str = "r1", **kw: object
    ) -> Enrollment:
        return enroll_device(
            self.ca,
            self.db,
            serial=serial,
            model=model,
            hw_rev=hw_rev,
            groups=["lab"],
            out_dir=self.tmp / "devices" / f"{serial}.{len(list(self.tmp.glob('devices/*')))}",
            **kw,  # type: ignore[arg-type]
        )

    def client(self, e: Enrollment | None, **kw: object) -> httpx.Client:
        """A device client (mTLS listener), or with ``e=None`` an admin client (admin listener)."""
        if e is None:
            ctx = ssl.create_default_context(cafile=str(self.tmp / "tls" / "ca.pem"))
            assert self.admin_server is not None
            url = self.admin_server.url
        else:
            ctx = device_context(e)
            url = self.url
        c = httpx.Client(base_url=url, verify=ctx, timeout=10, **kw)  # type: ignore[arg-type]
        self.clients.append(c)
        return c


def make_harness(
    db_url: str,
    ca: FleetCA,
    tls_dir: Path,
    tmp: Path,
    *,
    settings: ServerSettings | None = None,
    trust: TrustState | None = None,
    blobs: BlobStore | None = None,
) -> Harness:
    db = Database(db_url)
    db.upgrade()
    st = settings or ServerSettings(
        ca_cert=ca.cert,
        device_rate=RateLimit(rate=1000.0, burst=1000),
        ip_rate=RateLimit(rate=10000.0, burst=10000),
    )
    srv = UpdateServer(db, blobs or LocalBlobStore(tmp / "blobs"), st, trust, data_dir=tmp)
    ctx = server_ssl_context(tls_dir / "server.pem", tls_dir / "server.key", tls_dir / "ca.pem")
    server = ThreadedServer(srv.asgi("device"), ctx).start()
    adm_ctx = server_ssl_context(
        tls_dir / "server.pem", tls_dir / "server.key", None, require_client_cert=False
    )
    admin_server = ThreadedServer(srv.asgi("admin"), adm_ctx).start()
    (tmp / "tls").mkdir(exist_ok=True)
    shutil.copy(tls_dir / "ca.pem", tmp / "tls" / "ca.pem")
    return Harness(srv, server, ca, db, tmp, admin_server)


@contextlib.contextmanager
def harness(db_url: str, ca: FleetCA, tls_dir: Path, tmp: Path, **kw: object) -> Iterator[Harness]:
    h = make_harness(db_url, ca, tls_dir, tmp, **kw)  # type: ignore[arg-type]
    try:
        yield h
    finally:
        for c in h.clients:
            c.close()
        h.server.stop()
        if h.admin_server is not None:
            h.admin_server.stop()
        h.db.dispose()


@pytest.fixture
def hx(db_url: str, fleet_ca: FleetCA, server_tls: Path, tmp_path: Path) -> Iterator[Harness]:
    with harness(db_url, fleet_ca, server_tls, tmp_path) as h:
        yield h
