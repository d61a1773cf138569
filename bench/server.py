"""Update-server benchmark: mTLS check-ins/s on a 100,000-device registry (SQLite and
PostgreSQL), and image download throughput next to nginx serving the same file over TLS.

    .venv/bin/python bench/server.py            # full run (~1.5 min)
    .venv/bin/python bench/server.py --quick    # 20k registry, 128 devices, 3 s windows (~35 s)
    .venv/bin/python bench/server.py --cluster  # nodes and fleet sizes (~8 min, below)

Everything is real and on loopback: a fleet CA, a server certificate, one client certificate
per connecting device; the server runs in its own processes (``runtime.build_server`` +
uvicorn with the mTLS protocol, N workers each on a SO_REUSEPORT socket, as one would deploy
it); PostgreSQL is a throwaway cluster (``initdb``/``pg_ctl`` as the postgres user, fsync on).

The registry is bulk-inserted through the schema tables (Core ``insert`` executemany); only
the devices that actually connect get certificates. The load generator is separate processes,
each driving its share of keep-alive TLS connections from one epoll loop over non-blocking
``ssl`` sockets with pre-built requests (the cheapest client Python has), keeping a fixed
number of requests in flight and rotating through the connections, so every device identity
is used. Client and server CPU are measured (``getrusage`` / ``/proc``) so the table shows
whether the client was the bottleneck.

Cluster mode (``--cluster``, issue #20): 1 node on SQLite, 1 node on PostgreSQL (one process,
with the shared per-device limiter, and with the node's own buckets for reference), 1 node on
PostgreSQL as ``otaguard server run --workers N`` starts it (``--node-workers``), 3 one-process
nodes behind haproxy in TLS pass-through; then server and PostgreSQL CPU per
check-in and buffer pages per lookup at 10k, 100k and 1M registered devices (registries by
``COPY``). Results in docs/benchmarks.md.

Rate limits are raised for the run: all bench identities share 127.0.0.1 and each polls
~10x/s (a real device polls every few minutes); the buckets still run on every request.
Scenarios: "re-poll" (nothing changed since the device's last check-in and ``last_seen`` is
fresh: the read-only fast path) and "write each" (``lastseen_interval=0``: every check-in
updates the device row and commits; this is also what a fleet that polls less often than
``lastseen_interval`` costs, since each of its check-ins refreshes ``last_seen``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import glob
import hashlib
import json
import multiprocessing as mp
import os
import pwd
import resource
import secrets
import selectors
import shutil
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MIB = 1024 * 1024
CHECKIN_BODY = {
    "version": "1.4.2",
    "security_counter": 7,
    "keylist_version": 3,
    "slot_state": {"active": "a", "pending": None, "boot_count": 0},
}


# --- server processes ----------------------------------------------------------------------------
def serve_worker(cfg: dict[str, Any]) -> None:
    """One server worker process (``--serve-worker``): build the server as ``otaguard server
    run`` does and serve the device API on a SO_REUSEPORT socket shared with its siblings."""
    import uvicorn

    from otaguard.server.pki import mtls
    from otaguard.server.runtime import RunOptions, build_server

    opts = RunOptions(
        data_dir=Path(cfg["data_dir"]),
        ca_cert=Path(cfg["ca_cert"]),
        tls_cert=Path(cfg["tls_cert"]),
        tls_key=Path(cfg["tls_key"]),
        db_url=cfg["db_url"],
        device_rate=1000.0,
        device_burst=1000,
        ip_rate=1e7,
        ip_burst=1_000_000,
    )
    srv = build_server(opts)
    srv.settings.lastseen_interval = int(cfg["lastseen_interval"])
    if cfg.get("local_limits"):
        # The reference point for the shared limiter's cost: this process's own buckets.
        from otaguard.server.ratelimit import TokenBuckets

        srv.device_buckets = TokenBuckets(srv.settings.device_rate)
    ctx = mtls.server_ssl_context(opts.tls_cert, opts.tls_key, opts.ca_cert)  # type: ignore[arg-type]
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", int(cfg["port"])))
    sock.listen(1024)
    protocol = {
        "h11": mtls.MtlsH11Protocol,
        "httptools": getattr(mtls, "MtlsHttpToolsProtocol", None),
    }.get(cfg.get("http") or "")
    kw: dict[str, Any] = {"protocol": protocol} if protocol else {}
    config = mtls.uvicorn_config(srv.asgi("device"), ctx, **kw)
    server = uvicorn.Server(config)

    def announce() -> None:
        while not server.started:
            time.sleep(0.01)
        print("ready", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    asyncio.run(server.serve(sockets=[sock]))


@dataclass
class ServerGroup:
    procs: list[subprocess.Popen[bytes]]
    port: int

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def cpu_seconds(self) -> float:
        return sum(proc_cpu(p.pid) for p in self.procs)


def proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def system_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds from /proc/stat, all cores."""
    busy, total, _steal = cpu_times()
    return busy, total


def cpu_times() -> tuple[float, float, float]:
    """(busy, total, steal) CPU seconds from /proc/stat, all cores. Steal: time the VM's
    host ran something else — on a shared host it moves every number of a run."""
    with open("/proc/stat") as f:
        parts = [int(x) for x in f.readline().split()[1:]]
    tck = os.sysconf("SC_CLK_TCK")
    idle = parts[3] + parts[4]
    total = sum(parts[:8])
    return (total - idle) / tck, total / tck, parts[7] / tck


def background_cores() -> float:
    """Cores busy over one idle second before a run (other work skews every number)."""
    b0, t0 = system_busy()
    time.sleep(1.0)
    b1, t1 = system_busy()
    return (b1 - b0) / (t1 - t0) * (os.cpu_count() or 1)


def free_port() -> tuple[socket.socket, int]:
    """A port held by a bound (not listening) SO_REUSEPORT socket until the workers bind it."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 0))
    return s, s.getsockname()[1]


def start_servers(
    base: dict[str, Any], workers: int, lastseen_interval: int, **extra: Any
) -> ServerGroup:
    hold, port = free_port()
    cfg = dict(base, port=port, lastseen_interval=lastseen_interval, **extra)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--serve-worker", json.dumps(cfg)],
            stdout=subprocess.PIPE,
        )
        for _ in range(workers)
    ]
    group = ServerGroup(procs, port)
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            if line.strip() != b"ready":
                raise RuntimeError(f"server worker failed to start (exit {p.poll()})")
    except BaseException:
        group.stop()
        raise
    finally:
        hold.close()
    return group


# --- fixtures: CA, registry, PostgreSQL ----------------------------------------------------------
@dataclass
class Pki:
    ca_pem: Path
    server_pem: Path
    server_key: Path
    clients: list[tuple[str, Path, Path, str]]  # serial, cert, key, fingerprint


def make_pki(tmp: Path, n_clients: int, serials: list[str]) -> Pki:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from otaguard.server.pki.ca import FleetCA
    from otaguard.server.pki.enroll import issue_server_cert

    ca = FleetCA.create(tmp / "ca", passphrase=secrets.token_hex(16).encode())
    tls = tmp / "tls"
    issue_server_cert(ca, tls, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    ca_pem = tls / "ca.pem"
    ca_pem.write_bytes(ca.cert.public_bytes(serialization.Encoding.PEM))
    cdir = tmp / "clients"
    cdir.mkdir()
    clients = []
    for serial in serials[:n_clients]:
        key = ec.generate_private_key(ec.SECP256R1())
        issued = ca.issue_device(serial, key.public_key(), days=2)
        kp, cp = cdir / f"{serial}.key", cdir / f"{serial}.pem"
        kp.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        cp.write_bytes(issued.pem)
        clients.append((serial, cp, kp, issued.fingerprint))
    return Pki(ca_pem, tls / "server.pem", tls / "server.key", clients)


def populate(db_url: str, registry: int, pki: Pki, serials: list[str]) -> float:
    """Migrate and bulk-insert ``registry`` device rows (real fingerprints for the devices
    that connect, random ones for the rest). Returns seconds taken."""
    from sqlalchemy import func, insert, select

    from otaguard.server.storage import models as m
    from otaguard.server.storage.db import Database

    t0 = time.perf_counter()
    db = Database(db_url)
    db.upgrade()
    fps = {serial: fp for serial, _c, _k, fp in pki.clients}
    now = int(time.time())
    batch: list[dict[str, Any]] = []
    with db.write() as conn:
        for serial in serials:
            batch.append(
                {
                    "serial": serial,
                    "model": "gw",
                    "hw_rev": "r1",
                    "cert_fingerprint": fps.get(serial) or secrets.token_hex(32),
                    "cert_not_after": now + 86400,
                    "revoked": False,
                    "enrolled_at": now,
                    "suspect": False,
                }
            )
            if len(batch) == 10_000:
                conn.execute(insert(m.devices), batch)
                batch = []
        if batch:
            conn.execute(insert(m.devices), batch)
        ids = conn.execute(select(m.devices.c.id)).scalars().all()
        for i in range(0, len(ids), 10_000):
            conn.execute(
                insert(m.device_groups),
                [{"device_id": d, "name": "fleet"} for d in ids[i : i + 10_000]],
            )
        count = conn.execute(select(func.count()).select_from(m.devices)).scalar_one()
    if count != registry:
        raise RuntimeError(f"registry has {count} devices, wanted {registry}")
    if db.dialect == "postgresql":
        with db.engine.connect() as c:
            c.exec_driver_sql("COMMIT")
            c.exec_driver_sql("ANALYZE")
    db.dispose()
    return time.perf_counter() - t0


def find_pg(name: str) -> str | None:
    path = shutil.which(name)
    if path:
        return path
    hits = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    return hits[-1] if hits else None


@contextlib.contextmanager
def pg_cluster() -> Any:
    """A throwaway cluster on a unix socket in a temp dir, run as the postgres user under root.
    fsync stays on (unlike the test fixtures): commit cost is part of what is measured."""
    initdb, pg_ctl = find_pg("initdb"), find_pg("pg_ctl")
    if initdb is None or pg_ctl is None:
        yield None
        return
    as_pg: list[str] = []
    base = Path(tempfile.mkdtemp(prefix="otaguard-bench-pg-"))
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(base, pw.pw_uid, pw.pw_gid)
        as_pg = ["runuser", "-u", "postgres", "--"]
    data = base / "data"
    subprocess.run(
        [*as_pg, initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    opts = f"-k {base} -c listen_addresses='' -c max_connections=200 -c shared_buffers=256MB"
    subprocess.run(
        [*as_pg, pg_ctl, "-D", str(data), "-o", opts, "-l", str(base / "log"), "-w", "start"],
        check=True,
        capture_output=True,
    )
    try:
        import psycopg

        with psycopg.connect(
            host=str(base), user="postgres", dbname="postgres", autocommit=True
        ) as c:
            c.execute('CREATE DATABASE "bench"')
        yield f"postgresql+psycopg://postgres@/bench?host={base}"
    finally:
        subprocess.run([*as_pg, pg_ctl, "-D", str(data), "-m", "fast", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


# --- load generator ------------------------------------------------------------------------------
def client_context(ca: Path, cert: Path, key: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_verify_locations(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def checkin_request(port: int, serial: str) -> bytes:
    body = json.dumps(dict(CHECKIN_BODY, serial=serial), separators=(",", ":")).encode()
    head = (
        f"POST /v1/checkin HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def read_response(buf: bytes) -> tuple[int, bytes, bytes] | None:
    """(status, body, rest) once a whole Content-Length response is in ``buf``."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buf[:end].lower()
    i = head.find(b"content-length:")
    if i < 0:
        raise RuntimeError("response without Content-Length")
    j = head.find(b"\r\n", i)
    n = int(head[i + 15 : j if j > 0 else None])
    if len(buf) < end + 4 + n:
        return None
    return int(buf[9:12]), buf[end + 4 : end + 4 + n], buf[end + 4 + n :]


class Conn:
    __slots__ = ("buf", "req", "serial", "sock", "t")

    def __init__(self, sock: ssl.SSLSocket, req: bytes, serial: str) -> None:
        self.sock = sock
        self.req = req
        self.serial = serial
        self.buf = b""
        self.t = 0.0


def client_proc(
    clients: list[tuple[str, str, str]],
    ca: str,
    port: int,
    inflight: int,
    ready: Any,
    go: Any,
    times: Any,
    out: Any,
) -> None:
    """Open one keep-alive mTLS connection per identity, check each once (full JSON check),
    then run a closed loop with ``inflight`` outstanding requests until ``times[2]``."""

    def connect(client: tuple[str, str, str]) -> Conn:
        serial, cert, key = client
        ctx = client_context(Path(ca), Path(cert), Path(key))
        raw = socket.create_connection(("127.0.0.1", port))
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        c = Conn(s, checkin_request(port, serial), serial)
        s.sendall(c.req)
        while (r := read_response(c.buf)) is None:
            data = s.recv(65536)
            if not data:
                raise RuntimeError("server closed the connection")
            c.buf += data
        status, body, c.buf = r
        doc = json.loads(body)
        if status != 200 or doc.get("update") is not None or "poll_interval" not in doc:
            raise RuntimeError(f"unexpected first check-in for {serial}: {status} {body!r}")
        s.setblocking(False)
        return c

    with ThreadPoolExecutor(8) as pool:
        conns = list(pool.map(connect, clients))
    ready.set()
    go.wait()
    start, measure_from, until = float(times[0]), float(times[1]), float(times[2])
    while time.monotonic() < start:
        time.sleep(0.001)
    sel = selectors.DefaultSelector()
    for c in conns:
        sel.register(c.sock, selectors.EVENT_READ, c)
    idle = list(reversed(conns))
    lat: list[float] = []
    errors = 0
    done = 0
    ru0 = None
    pc = time.perf_counter

    def send(c: Conn) -> None:
        c.t = pc()
        n = c.sock.send(c.req)
        if n != len(c.req):
            raise RuntimeError("short send")

    for _ in range(min(inflight, len(idle))):
        send(idle.pop())
    stop = False
    t_first = 0.0
    queue = deque(reversed(idle))
    while not stop:
        for key, _ev in sel.select(1.0):
            c = key.data
            try:
                while True:
                    data = c.sock.recv(65536)
                    if not data:
                        raise RuntimeError("server closed a keep-alive connection")
                    c.buf += data
            except ssl.SSLWantReadError:
                pass
            r = read_response(c.buf)
            if r is None:
                continue
            now = pc()
            status, _body, c.buf = r
            mono = time.monotonic()
            if mono >= measure_from:
                if ru0 is None:
                    ru0 = resource.getrusage(resource.RUSAGE_SELF)
                    t_first = mono
                lat.append(now - c.t)
                done += 1
                if status != 200:
                    errors += 1
            if mono >= until:
                stop = True
                continue
            queue.append(c)
            send(queue.popleft())
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = 0.0
    elapsed = 0.0
    if ru0 is not None:
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        elapsed = time.monotonic() - t_first
    out.send((done, errors, lat, cpu, elapsed))
    for c in conns:
        c.sock.close()


@dataclass
class LoadResult:
    rate: float
    p50_ms: float
    p99_ms: float
    errors: int
    client_cores: float
    server_cores: float
    other_cores: float
    db_cores: float = 0.0  # PostgreSQL's processes (cluster mode), part of other_cores


def run_load(
    group: ServerGroup,
    pki: Pki,
    procs: int,
    inflight: int,
    warmup: float,
    duration: float,
    db_cpu: Any = None,
) -> LoadResult:
    ctx = mp.get_context("fork")
    shares = [pki.clients[i::procs] for i in range(procs)]
    ready = [ctx.Event() for _ in range(procs)]
    go = ctx.Event()
    pipes = []
    workers = []
    times = ctx.Array("d", 3)
    for i in range(procs):
        parent, child = ctx.Pipe(duplex=False)
        share = [(s, str(c), str(k)) for s, c, k, _fp in shares[i]]
        p = ctx.Process(
            target=client_proc,
            args=(
                share,
                str(pki.ca_pem),
                group.port,
                inflight // procs,
                ready[i],
                go,
                times,
                child,
            ),
        )
        p.start()
        child.close()  # so a crashed client shows up as EOFError, not a hang
        pipes.append(parent)
        workers.append(p)
    t_conn = time.perf_counter()
    for ev in ready:
        if not ev.wait(120):
            raise RuntimeError("load generator did not connect")
    print(
        f"  ({len(pki.clients)} mTLS connections + first check-ins in {time.perf_counter() - t_conn:.1f} s)",
        flush=True,
    )
    start = time.monotonic() + 0.2
    measure_from = start + warmup
    until = measure_from + duration
    times[0], times[1], times[2] = start, measure_from, until
    go.set()
    while time.monotonic() < measure_from:
        time.sleep(0.005)
    s0, b0 = group.cpu_seconds(), system_busy()[0]
    d0 = db_cpu() if db_cpu else 0.0
    while time.monotonic() < until:
        time.sleep(0.005)
    s1, b1 = group.cpu_seconds(), system_busy()[0]
    d1 = db_cpu() if db_cpu else 0.0
    results = [pp.recv() for pp in pipes]
    for p in workers:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"load generator exited with {p.exitcode}")
    done = sum(r[0] for r in results)
    errors = sum(r[1] for r in results)
    lat = sorted(x for r in results for x in r[2])
    elapsed = max(r[4] for r in results)
    client_cpu = sum(r[3] for r in results)
    server_cpu = s1 - s0
    busy = b1 - b0
    return LoadResult(
        rate=done / elapsed,
        p50_ms=1000 * lat[len(lat) // 2],
        p99_ms=1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
        errors=errors,
        client_cores=client_cpu / elapsed,
        server_cores=server_cpu / duration,
        other_cores=max(0.0, busy - client_cpu - server_cpu) / duration,
        db_cores=(d1 - d0) / duration,
    )


# --- image download ------------------------------------------------------------------------------
def add_image(db_url: str, data_dir: Path, serial: str, size: int) -> tuple[str, Path]:
    """Put a random image into the blob store and let ``serial`` fetch it (a release row and
    an assignment, written through the store layer). Returns (blob name, file path)."""
    from otaguard.server.storage import store
    from otaguard.server.storage.blobs import LocalBlobStore
    from otaguard.server.storage.db import Database

    blobs = LocalBlobStore(data_dir / "blobs")
    name, n = blobs.put_stream((os.urandom(MIB) for _ in range(size // MIB)), size)
    assert n == size
    db = Database(db_url)
    with db.write() as conn:
        dev = store.device_by_serial(conn, serial)
        assert dev is not None
        rid = store.insert_release(
            conn,
            {
                "model": "gw",
                "hw_rev": "r1",
                "vendor_id": "00000000-0000-0000-0000-000000000001",
                "class_id": "00000000-0000-0000-0000-000000000002",
                "version": "9.9.9",
                "security_counter": 8,
                "sequence_number": 1,
                "digest_alg": "sha256",
                "manifest_digest": secrets.token_hex(32),
                "envelope_blob": secrets.token_hex(32),
                "image_digest": name,
                "image_size": size,
                "image_blob": name,
                "signers": "[]",
            },
        )
        store.assign(conn, dev.id, rid, None)
    db.dispose()
    return name, blobs.path(name)


def download(port: int, ctx: ssl.SSLContext, path: str, expect: int, check: str | None) -> float:
    """GET ``path`` over one TLS connection; return MB/s (10^6 B/s) of the body."""
    raw = socket.create_connection(("127.0.0.1", port))
    s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    try:
        t0 = time.perf_counter()
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        buf = bytearray(4 * MIB)
        view = memoryview(buf)
        head = b""
        while b"\r\n\r\n" not in head:
            n = s.recv_into(view)
            if not n:
                raise RuntimeError("no response")
            head += bytes(view[:n])
        end = head.index(b"\r\n\r\n")
        status = int(head[9:12])
        if status != 200:
            raise RuntimeError(f"download {path}: HTTP {status}: {head[:200]!r}")
        h = hashlib.sha256() if check else None
        first = head[end + 4 :]
        got = len(first)
        if h:
            h.update(first)
        while got < expect:
            n = s.recv_into(view)
            if not n:
                break
            got += n
            if h:
                h.update(view[:n])
        dt_s = time.perf_counter() - t0
        if got != expect:
            raise RuntimeError(f"download {path}: {got} of {expect} bytes")
        if h and h.hexdigest() != check:
            raise RuntimeError(f"download {path}: digest mismatch")
        return expect / dt_s / 1e6
    finally:
        s.close()


@contextlib.contextmanager
def nginx_server(tmp: Path, pki: Pki, image: Path, workers: int) -> Any:
    exe = shutil.which("nginx") or (
        "/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None
    )
    if exe is None:
        yield None
        return
    d = tmp / "nginx"
    d.mkdir()
    hold, port = free_port()
    hold.close()
    user = "user root root;" if os.geteuid() == 0 else ""
    temps = "\n".join(
        f"    {k}_temp_path {d}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (d / "nginx.conf").write_text(
        f"""{user}
worker_processes {workers};
daemon off;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
{temps}
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {pki.server_pem};
        ssl_certificate_key {pki.server_key};
        ssl_client_certificate {pki.ca_pem};
        ssl_verify_client on;
        ssl_protocols TLSv1.2 TLSv1.3;
        location /v1/images/ {{
            alias {image.parent}/;
            default_type application/octet-stream;
        }}
    }}
}}
"""
    )
    proc = subprocess.Popen(
        [exe, "-p", str(d), "-c", str(d / "nginx.conf"), "-e", str(d / "error.log")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        for _ in range(500):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
                break
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"nginx failed: {err}")
            time.sleep(0.01)
        yield (port, proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its direct children (nginx master + workers)."""
    total = proc_cpu(pid)
    with contextlib.suppress(OSError):
        for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split():
            with contextlib.suppress(OSError):
                total += proc_cpu(int(child))
    return total


# --- main ----------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="20k registry, 128 devices, 3 s windows")
    ap.add_argument("--registry", type=int, help="enrolled devices (default 100000)")
    ap.add_argument("--devices", type=int, help="connecting devices = client certs (default 256)")
    ap.add_argument("--workers", type=int, default=2, help="server worker processes")
    ap.add_argument("--client-procs", type=int, default=2)
    ap.add_argument("--inflight", type=int, default=32, help="requests outstanding in total")
    ap.add_argument("--duration", type=float, help="measured seconds per scenario (default 8)")
    ap.add_argument("--warmup", type=float, help="unmeasured seconds first (default 2)")
    ap.add_argument("--http", choices=["auto", "h11", "httptools"], default="auto")
    ap.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    ap.add_argument("--image-mib", type=int, default=64)
    ap.add_argument("--no-download", action="store_true")
    ap.add_argument(
        "--cluster",
        action="store_true",
        help="cluster mode: 1 node SQLite / 1 node PostgreSQL / 3 nodes behind haproxy, and "
        "server CPU per check-in against the registry size (--fleet-sizes)",
    )
    ap.add_argument(
        "--fleet-sizes",
        default="10000,100000,1000000",
        help="cluster mode: registry sizes for the CPU-per-check-in rows",
    )
    ap.add_argument(
        "--node-workers",
        default="2",
        type=lambda v: [int(x) for x in v.split(",") if x],
        help="cluster mode: rows for one `server run --workers N` node on PostgreSQL, "
        "comma-separated N",
    )
    ap.add_argument(
        "--node-inflight",
        default="32,16",
        type=lambda v: [int(x) for x in v.split(",") if x],
        help="cluster mode: requests in flight for the --node-workers rows (latency at "
        "several loads: by Little's law p50 ≈ in flight / rate)",
    )
    ap.add_argument("--serve-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_worker:
        serve_worker(json.loads(args.serve_worker))
        return 0
    if args.cluster:
        return cluster_main(args)
    registry = args.registry or (20_000 if args.quick else 100_000)
    n_dev = args.devices or (128 if args.quick else 256)
    duration = args.duration or (3.0 if args.quick else 8.0)
    warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 2.0)
    http = None if args.http == "auto" else args.http
    step = max(1, registry // n_dev)
    serials = [f"bench-{i:06d}" for i in range(registry)]
    connecting = [serials[i * step] for i in range(n_dev)]
    chosen = set(connecting)
    rest = [s for s in serials if s not in chosen]
    ordered = connecting + rest  # make_pki issues certs for the first n_dev

    from otaguard.server.storage.db import sqlite_url

    rows: list[list[str]] = []
    dl_rows: list[list[str]] = []
    print(
        f"registry {registry} devices, {n_dev} connecting (one client cert + one keep-alive mTLS "
        f"connection each), {args.inflight} in flight, {args.workers} server workers, "
        f"{args.client_procs} client processes, {os.cpu_count()} CPUs; "
        f"warm-up {warmup:g} s, measured {duration:g} s",
        flush=True,
    )
    print(
        f"background CPU load before the run: {background_cores():.2f}"
        " cores busy (other work on the machine skews every number below)",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="otaguard-bench-") as tmp_s:
        tmp = Path(tmp_s)
        pki = make_pki(tmp, n_dev, ordered)
        pki.clients.sort(key=lambda c: c[0])
        dbs = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
        for dbname in dbs:
            with contextlib.ExitStack() as stack:
                data_dir = tmp / f"data-{dbname}"
                if dbname == "sqlite":
                    url = sqlite_url(data_dir / "otaguard.db")
                    data_dir.mkdir()
                else:
                    url = stack.enter_context(pg_cluster())
                    if url is None:
                        print("PostgreSQL binaries not found: skipping", flush=True)
                        continue
                secs = populate(url, registry, pki, serials)
                print(f"{dbname}: {registry} devices inserted in {secs:.1f} s", flush=True)
                base = {
                    "data_dir": str(data_dir),
                    "ca_cert": str(pki.ca_pem),
                    "tls_cert": str(pki.server_pem),
                    "tls_key": str(pki.server_key),
                    "db_url": url,
                    "http": http,
                }
                for scen, interval in (("re-poll", 60), ("write each", 0)):
                    group = start_servers(base, args.workers, interval)
                    try:
                        r = run_load(group, pki, args.client_procs, args.inflight, warmup, duration)
                    finally:
                        group.stop()
                    rows.append(
                        [
                            dbname,
                            scen,
                            f"{r.rate:,.0f}",
                            f"{r.p50_ms:.1f}",
                            f"{r.p99_ms:.1f}",
                            str(r.errors),
                            f"{r.server_cores:.2f}",
                            f"{r.client_cores:.2f}",
                            f"{r.other_cores:.2f}",
                            f"{1e6 * r.server_cores / r.rate:,.0f}" if r.rate else "-",
                        ]
                    )
                    print("  " + " | ".join(rows[-1]), flush=True)
                if dbname == "sqlite" and not args.no_download:
                    dl_rows = image_bench(tmp, pki, base, url, args.image_mib, args.workers)
    print_table(
        ["database", "scenario", "check-ins/s", "p50 ms", "p99 ms", "errors", "server cores",
         "client cores", "other cores", "server CPU µs/check-in"],
        rows,
        text_columns=2,
    )  # fmt: skip
    if dl_rows:
        print_table(
            [f"{args.image_mib} MiB image over mTLS", "MB/s (median of 3)", "server cores",
             "vs nginx"],
            dl_rows,
        )  # fmt: skip
    return 0


def print_table(header: list[str], rows: list[list[str]], text_columns: int = 1) -> None:
    """A Markdown table (as docs/benchmarks.md shows it): the first ``text_columns`` columns
    left-aligned, the numbers right-aligned."""
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i < text_columns else "---:" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def image_bench(
    tmp: Path, pki: Pki, base: dict[str, Any], url: str, mib: int, workers: int
) -> list[list[str]]:
    serial, cert, key, _fp = pki.clients[0]
    name, path = add_image(url, Path(base["data_dir"]), serial, mib * MIB)
    size = mib * MIB
    ctx = client_context(pki.ca_pem, cert, key)
    results: dict[str, tuple[float, float]] = {}
    group = start_servers(base, workers, 60)
    try:
        pid_cpu = group.cpu_seconds
        results["otaguard"] = _downloads(group.port, ctx, f"/v1/images/{name}", size, name, pid_cpu)
    finally:
        group.stop()
    with nginx_server(tmp, pki, path, workers) as ng:
        if ng is None:
            print("nginx not found: skipping the comparison", flush=True)
        else:
            port, proc = ng
            results["nginx"] = _downloads(
                port, ctx, f"/v1/images/{name}", size, name, lambda: tree_cpu(proc.pid)
            )
    out = []
    ref = results.get("nginx", (0.0, 0.0))[0]
    for who, (mbs, cores) in results.items():
        out.append([who, f"{mbs:,.0f}", f"{cores:.2f}", f"{mbs / ref:.2f}" if ref else "-"])
    return out


def _downloads(
    port: int, ctx: ssl.SSLContext, path: str, size: int, digest: str, cpu: Any
) -> tuple[float, float]:
    download(port, ctx, path, size, digest)  # warm + verify content once
    speeds = []
    c0, t0 = cpu(), time.perf_counter()
    for _ in range(3):
        speeds.append(download(port, ctx, path, size, None))
    cores = (cpu() - c0) / (time.perf_counter() - t0)
    return statistics.median(speeds), cores


# --- cluster mode (--cluster) --------------------------------------------------------------------
def pg_database(url: str, name: str) -> str:
    """A new database in the cluster of ``url`` (same host socket), returned as a URL."""
    import psycopg

    host = url.split("?host=")[1]
    with psycopg.connect(host=host, user="postgres", dbname="postgres", autocommit=True) as c:
        c.execute(f'CREATE DATABASE "{name}"')
    return f"postgresql+psycopg://postgres@/{name}?host={host}"


def populate_copy(db_url: str, registry: int, pki: Pki) -> float:
    """PostgreSQL registry of ``registry`` devices by COPY (a million rows in seconds, not via
    the API): ``bench-0000000``..., real fingerprints for the devices that connect; every
    device in a group and with a rate-limit bucket row, as a fleet that polls has."""
    import psycopg

    from otaguard.server.storage.db import Database

    t0 = time.perf_counter()
    db = Database(db_url)
    db.upgrade()
    cargs, cparams = db.engine.dialect.create_connect_args(db.engine.url)
    db.dispose()
    fps = {serial: fp for serial, _c, _k, fp in pki.clients}
    now = int(time.time())
    with psycopg.connect(*cargs, **cparams) as conn:
        with conn.cursor().copy(
            "COPY devices (serial, model, hw_rev, cert_fingerprint, cert_not_after, revoked,"
            " enrolled_at, suspect) FROM STDIN"
        ) as cp:
            for i in range(registry):
                serial = f"bench-{i:07d}"
                fp = fps.get(serial) or secrets.token_hex(32)
                cp.write_row((serial, "gw", "r1", fp, now + 86400, False, now, False))
        conn.execute("INSERT INTO device_groups (device_id, name) SELECT id, 'fleet' FROM devices")
        conn.execute(
            "INSERT INTO rate_buckets (key, tokens, at, ok) "
            "SELECT serial, 1000.0, %s, true FROM devices",
            (float(now),),
        )
        n = conn.execute("SELECT count(*) FROM devices").fetchone()
        conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE")
        # Write the bulk load's dirty pages now, not while the next rows measure (the
        # checkpointer then competed for the two cores: "other" 0.8+ in the 1M rows).
        conn.execute("CHECKPOINT")
    if n is None or n[0] != registry:
        raise RuntimeError(f"registry has {n} devices, wanted {registry}")
    return time.perf_counter() - t0


def lookup_pages(db_url: str, serial: str) -> tuple[int, int]:
    """Buffer pages PostgreSQL touches to find one device row and its rate-limit bucket
    (EXPLAIN ANALYZE BUFFERS): the machine-independent part of how a check-in's cost grows
    with the registry (B-tree depth)."""
    import psycopg

    from otaguard.server.storage.db import Database

    db = Database(db_url)
    cargs, cparams = db.engine.dialect.create_connect_args(db.engine.url)
    db.dispose()
    out = []
    with psycopg.connect(*cargs, **cparams) as c:
        for sql in (
            "SELECT * FROM devices WHERE serial = %s",
            "SELECT * FROM rate_buckets WHERE key = %s",
        ):
            c.execute(sql, (serial,))  # warm
            row = c.execute(f"EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) {sql}", (serial,)).fetchone()
            assert row is not None
            plan = row[0][0]["Plan"]
            out.append(int(plan["Shared Hit Blocks"]) + int(plan["Shared Read Blocks"]))
    return out[0], out[1]


HAPROXY_BENCH = """global
    maxconn 4000
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
frontend devices
    bind 127.0.0.1:{port}
    default_backend nodes
backend nodes
    balance roundrobin
{servers}
"""


class NodeGroup(ServerGroup):
    """One ``otaguard server run --workers N`` node: its CPU is the first process's and its
    forked workers'."""

    def cpu_seconds(self) -> float:
        return tree_cpu(self.procs[0].pid)


def cli_node(base: dict[str, Any], workers: int) -> NodeGroup:
    """A node as an operator starts it (``otaguard server run --workers N``), with the rate
    limits raised as for the other rows."""
    hold, port = free_port()
    hold.close()
    hold_a, admin_port = free_port()
    hold_a.close()
    argv = [
        sys.executable, "-m", "otaguard.cli.main", "server", "run",
        "--data-dir", base["data_dir"], "--db", base["db_url"],
        "--ca-cert", base["ca_cert"], "--tls-cert", base["tls_cert"], "--tls-key", base["tls_key"],
        "--port", str(port), "--admin-port", str(admin_port), "--workers", str(workers),
        "--device-rate", "1000", "--device-burst", "1000",
        "--ip-rate", "10000000", "--ip-burst", "1000000",
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    if not proc.stdout.readline().startswith(b"listening"):
        proc.kill()
        raise RuntimeError(f"server run --workers {workers} failed to start")
    time.sleep(3.0)  # the workers build their servers once the first process has
    return NodeGroup([proc], port)


@contextlib.contextmanager
def cluster_group(base: dict[str, Any], nodes: int, tmp: Path) -> Any:
    """``nodes`` server processes (one ``otaguard server run`` worker each, own port) behind
    haproxy in TCP mode (TLS pass-through). Yields a ServerGroup whose port is haproxy's
    and whose CPU is the nodes' (haproxy's goes to "other"), and haproxy's process."""
    exe = shutil.which("haproxy") or "/usr/sbin/haproxy"
    groups = [start_servers(base, 1, 60) for _ in range(nodes)]
    hold, port = free_port()
    hold.close()
    servers = "\n".join(f"    server n{i} 127.0.0.1:{g.port}" for i, g in enumerate(groups))
    cfg = tmp / "haproxy.cfg"
    cfg.write_text(HAPROXY_BENCH.format(port=port, servers=servers))
    proc = subprocess.Popen([exe, "-db", "-f", str(cfg)], stdout=subprocess.DEVNULL)
    try:
        for _ in range(500):
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.1):
                break
            time.sleep(0.01)
        yield ServerGroup([p for g in groups for p in g.procs], port), proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        for g in groups:
            g.stop()


def cluster_main(args: Any) -> int:
    n_dev = args.devices or 256
    registry = args.registry or 100_000
    duration = args.duration or 8.0
    warmup = args.warmup if args.warmup is not None else 2.0
    sizes = [int(x) for x in args.fleet_sizes.split(",") if x]
    # The connecting devices are spread over the smallest registry, so they exist in all.
    smallest = min([registry, *sizes])
    step = max(1, smallest // n_dev)
    connecting = [f"bench-{i * step:07d}" for i in range(n_dev)]
    print(
        f"cluster mode: {n_dev} connecting devices, {args.inflight} in flight, "
        f"{args.client_procs} client processes, {os.cpu_count()} CPUs; re-poll check-ins; "
        f"warm-up {warmup:g} s, measured {duration:g} s",
        flush=True,
    )
    print(f"background load: {background_cores():.2f} cores busy")
    _b, total0, steal0 = cpu_times()
    rows: list[list[str]] = []
    scale: list[list[str]] = []

    db_cpu: Any = None

    def measure(label: str, group: ServerGroup, inflight: int | None = None) -> LoadResult:
        n = inflight or args.inflight
        if n != args.inflight:
            label = f"{label}, {n} in flight"
        r = run_load(group, pki, args.client_procs, n, warmup, duration, db_cpu)
        us = 1e6 * r.server_cores / r.rate if r.rate else 0.0
        db_us = 1e6 * r.db_cores / r.rate if r.rate and db_cpu else 0.0
        rows.append(
            [
                label,
                f"{r.rate:,.0f}",
                f"{r.p50_ms:.1f}",
                f"{r.p99_ms:.1f}",
                str(r.errors),
                f"{r.server_cores:.2f}",
                f"{r.client_cores:.2f}",
                f"{r.other_cores:.2f}",
                f"{us:,.0f}",
                f"{db_us:,.0f}" if db_cpu else "-",
            ]
        )
        print("  " + " | ".join(rows[-1]), flush=True)
        return r

    from otaguard.server.storage.db import sqlite_url

    with tempfile.TemporaryDirectory(prefix="otaguard-bench-") as tmp_s:
        tmp = Path(tmp_s)
        pki = make_pki(tmp, n_dev, connecting)
        pki.clients.sort(key=lambda c: c[0])
        tls = {
            "ca_cert": str(pki.ca_pem),
            "tls_cert": str(pki.server_pem),
            "tls_key": str(pki.server_key),
            "http": None,
        }
        # 1 node on SQLite.
        data = tmp / "data-sqlite"
        data.mkdir()
        url = sqlite_url(data / "otaguard.db")
        secs = populate(url, registry, pki, [f"bench-{i:07d}" for i in range(registry)])
        print(f"sqlite: {registry} devices in {secs:.1f} s", flush=True)
        base = dict(tls, data_dir=str(data), db_url=url)
        group = start_servers(base, 1, 60)
        try:
            measure(f"1 node, SQLite, {registry:,} devices", group)
        finally:
            group.stop()
        with pg_cluster() as pg_url:
            if pg_url is None:
                print("PostgreSQL binaries not found: skipping", flush=True)
                return 0
            pid_file = Path(pg_url.split("?host=")[1]) / "data" / "postmaster.pid"
            postmaster = int(pid_file.read_text().split()[0])

            def db_cpu() -> float:  # the postmaster and its backends
                return tree_cpu(postmaster)

            url = pg_database(pg_url, "reg_main")
            secs = populate_copy(url, registry, pki)
            print(f"postgresql: {registry} devices by COPY in {secs:.1f} s", flush=True)
            base = dict(tls, data_dir=str(tmp / "data-pg"), db_url=url)
            for label, extra in (
                ("1 node, PostgreSQL, shared limits", {}),
                ("1 node, PostgreSQL, local limits (reference)", {"local_limits": True}),
            ):
                group = start_servers(base, 1, 60, **extra)
                try:
                    measure(f"{label}, {registry:,} devices", group)
                finally:
                    group.stop()
            for n in args.node_workers:
                group = cli_node(base, n)
                try:
                    for inflight in args.node_inflight or [args.inflight]:
                        measure(
                            f"1 node, PostgreSQL, --workers {n}, {registry:,} devices",
                            group,
                            inflight,
                        )
                finally:
                    group.stop()
            with cluster_group(base, 3, tmp) as (group, _haproxy):
                measure(f"3 nodes + haproxy, PostgreSQL, {registry:,} devices", group)
            for size in sizes:
                url = pg_database(pg_url, f"reg_{size}")
                secs = populate_copy(url, size, pki)
                print(f"postgresql: {size} devices by COPY in {secs:.1f} s", flush=True)
                base = dict(tls, data_dir=str(tmp / f"data-pg-{size}"), db_url=url)
                group = start_servers(base, 1, 60)
                try:
                    r = measure(f"1 node, PostgreSQL, {size:,} devices", group)
                finally:
                    group.stop()
                us = 1e6 * r.server_cores / r.rate if r.rate else 0.0
                pg_us = 1e6 * r.db_cores / r.rate if r.rate else 0.0
                dev_pages, bucket_pages = lookup_pages(url, connecting[-1])
                scale.append(
                    [
                        f"{size:,}",
                        f"{r.rate:,.0f}",
                        f"{us:,.0f}",
                        f"{pg_us:,.0f}",
                        str(dev_pages),
                        str(bucket_pages),
                    ]
                )
    print_table(
        ["configuration", "check-ins/s", "p50 ms", "p99 ms", "errors", "server cores",
         "client cores", "other cores", "server CPU µs/check-in", "PostgreSQL CPU µs/check-in"],
        rows,
    )  # fmt: skip
    if scale:
        print_table(
            ["registered devices", "check-ins/s", "server µs/check-in", "PostgreSQL µs/check-in",
             "pages per device lookup", "pages per bucket lookup"],
            scale,
            text_columns=0,
        )  # fmt: skip
        first, last = float(scale[0][2].replace(",", "")), float(scale[-1][2].replace(",", ""))
        print(f"\nserver CPU per check-in, largest / smallest registry: {last / first:.2f}x")
    _b, total1, steal1 = cpu_times()
    print(f"steal time over the run: {100 * (steal1 - steal0) / (total1 - total0):.2f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
