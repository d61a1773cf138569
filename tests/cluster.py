"""Several real ``otaguard server run`` processes on one database, for the multi-node suites.

A :class:`Node` is one server process with its own data directory (TUF keys, audit log). The
blob store all nodes share is either one directory (each node's ``blobs`` a symlink to it) or,
with :func:`s3_blobs`, one bucket of the S3 test server (moto) that every node is pointed at.
:func:`haproxy` puts Debian's haproxy in front of the nodes' device listeners in TCP mode (TLS
pass-through: the mTLS handshake still ends at a node, which sees the device's certificate).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.pg import _as_postgres
from tests.support import require_binary, server_run_argv


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Node:
    name: str
    data: Path
    tls: Path
    db_url: str
    extra: list[str]
    shared_blobs: Path | None  # None: the blob store is in ``extra`` (S3)
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    admin_port: int = field(default_factory=free_port)
    proc: subprocess.Popen[str] | None = None

    @property
    def dev_url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    @property
    def adm_url(self) -> str:
        return f"https://127.0.0.1:{self.admin_port}"

    def start(self) -> Node:
        self.data.mkdir(parents=True, exist_ok=True, mode=0o700)
        link = self.data / "blobs"
        if self.shared_blobs is not None and not link.exists():
            link.symlink_to(self.shared_blobs, target_is_directory=True)
        argv = server_run_argv(self.data, self.tls, "--db", self.db_url, *self.extra)
        argv[argv.index("--port") + 1] = str(self.port)
        argv[argv.index("--admin-port") + 1] = str(self.admin_port)
        log = open(self.data / "server.log", "a")  # noqa: SIM115 - handed to the child
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=log, text=True, env={**os.environ, **self.env}
        )
        log.close()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("listening"):
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"{self.name} did not start: {line!r}\n{self.log_text()}")
        return self

    def log_text(self) -> str:
        p = self.data / "server.log"
        return p.read_text(errors="replace")[-4000:] if p.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (what a crashed host looks like to the cluster)."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def admin(self, token: str) -> httpx.Client:
        ctx = ssl.create_default_context(cafile=str(self.tls / "ca.pem"))
        return httpx.Client(
            base_url=self.adm_url,
            verify=ctx,
            headers={"Authorization": f"Bearer {token}"},
            timeout=20,
        )


@dataclass
class BlobStore:
    """How every node of a cluster reaches the one blob store: server flags and environment."""

    args: list[str]
    env: dict[str, str]
    bucket: str = ""


def s3_blobs(moto: Any) -> BlobStore:
    """A fresh bucket on the S3 test server (tests/s3server.py), credentials in the env."""
    from tests.s3server import S3_ENV

    bucket = moto.new_bucket()
    return BlobStore(
        ["--storage-backend", "s3", "--s3-bucket", bucket, "--s3-endpoint-url", moto.url,
         "--s3-region", "us-east-1"],
        dict(S3_ENV),
        bucket,
    )  # fmt: skip


@contextmanager
def nodes(
    n: int, tmp: Path, tls: Path, db_url: str, *extra: str, blobs: BlobStore | None = None
) -> Iterator[list[Node]]:
    """``n`` nodes on ``db_url``; blobs in one shared directory unless ``blobs`` says else."""
    shared: Path | None = None
    args, env = list(extra), {}
    if blobs is None:
        shared = tmp / "shared-blobs"
        shared.mkdir(exist_ok=True, mode=0o700)
    else:
        args, env = [*args, *blobs.args], blobs.env
    started: list[Node] = []
    try:
        for i in range(n):
            node = Node(f"node{i + 1}", tmp / f"node{i + 1}", tls, db_url, args, shared, env)
            started.append(node.start())
        yield started
    finally:
        for node in started:
            node.stop()


HAPROXY_CFG = """\
global
    maxconn 2000
    log stdout format raw local0 warning
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    retries 2
    option redispatch
frontend devices
    bind 127.0.0.1:{port}
    default_backend otaguard
backend otaguard
    balance roundrobin
    # TLS pass-through: haproxy checks that a node's device listener answers a TLS
    # handshake-less TCP connect; mTLS itself ends at the node.
    option tcp-check
    default-server inter 300ms fall 2 rise 1 on-marked-down shutdown-sessions
{servers}
"""


@dataclass
class Balancer:
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"


def haproxy_config(port: int, backends: list[Node]) -> str:
    servers = "\n".join(f"    server {b.name} 127.0.0.1:{b.port} check" for b in backends)
    return HAPROXY_CFG.format(port=port, servers=servers)


@contextmanager
def haproxy(tmp: Path, backends: list[Node]) -> Iterator[Balancer]:
    binary = require_binary("haproxy")
    port = free_port()
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(haproxy_config(port, backends))
    subprocess.run([binary, "-c", "-q", "-f", str(cfg)], check=True)
    proc = subprocess.Popen(
        [binary, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise AssertionError("haproxy did not start") from None
                time.sleep(0.05)
        yield Balancer(port, proc)
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@dataclass
class OwnPg:
    """A PostgreSQL cluster of this test's own, so the test may stop and start it."""

    base: Path
    pg_ctl: str
    opts: str

    def url(self, dbname: str = "otaguard") -> str:
        return f"postgresql+psycopg://postgres@/{dbname}?host={self.base}"

    def _ctl(self, *args: str) -> None:
        data = str(self.base / "data")
        log = str(self.base / "log")
        subprocess.run(
            _as_postgres([self.pg_ctl, "-D", data, "-o", self.opts, "-l", log, *args]),
            check=True,
            capture_output=True,
        )

    def start(self) -> None:
        self._ctl("-w", "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "-w", "stop")


@contextmanager
def own_pg(tmp: Path) -> Iterator[OwnPg]:
    import psycopg

    initdb, pg_ctl = require_binary("initdb"), require_binary("pg_ctl")
    base = Path(tempfile.mkdtemp(prefix="otaguard-pg-own-"))
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(base, pw.pw_uid, pw.pw_gid)
    subprocess.run(
        _as_postgres([initdb, "-D", str(base / "data"), "-A", "trust", "-U", "postgres"]),
        check=True,
        capture_output=True,
    )
    pg = OwnPg(base, pg_ctl, f"-k {base} -c listen_addresses='' -c fsync=off")
    pg.start()
    try:
        with psycopg.connect(
            host=str(base), user="postgres", dbname="postgres", autocommit=True
        ) as c:
            c.execute('CREATE DATABASE "otaguard"')
        yield pg
    finally:
        with contextlib.suppress(subprocess.CalledProcessError):
            pg._ctl("-m", "immediate", "stop")
        shutil.rmtree(base, ignore_errors=True)
