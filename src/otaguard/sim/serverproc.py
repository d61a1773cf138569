"""The simulator's update server in its own processes (their own GILs: the other core).

The server is stateless apart from its database and blob store, so the simulator prepares
those (schema, CA, TLS certificates, enrolled devices) in its own process and then starts
these children, which serve the device API (mTLS) and the admin API (TLS + bearer tokens)
with :class:`~otaguard.server.pki.mtls.ThreadedServer` exactly as in-process, on the simulator's
:class:`~.sharedclock.SharedClock` (rate limiter, probe detector, campaign engine and store
timestamps all read it). The parent talks to them only over HTTPS (devices, admin API) and
the shared database; pipes carry the readiness back and the stop request in.

With ``procs`` > 1 the device listener is one socket bound here and inherited by every child
(pre-fork: the kernel hands each new connection to one of them), the way production scales
out with stateless app processes on one database (DESIGN.md): campaign decisions re-read the
campaign row under the database's writer lock, and each process refreshes its cached
campaigns every few simulated seconds. The admin listener is served by the first child only,
so the operator's changes (trust anchors for release uploads included) land in one process.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..errors import ErrorCode, OtaError
from .children import sigint_ignored


@dataclass(frozen=True)
class ServerSpec:
    db_url: str
    blobs: Path
    tls_dir: Path  # server.pem, server.key, ca.pem
    clock_name: str  # SharedClock block
    bundle: bytes  # the trust bundle releases are checked against
    procs: int = 1  # server processes sharing the device listener


def _serve(spec: ServerSpec, dev_fd: int, adm_fd: int | None) -> None:
    import socket

    from ..server.app import UpdateServer
    from ..server.context import ServerSettings, TrustState
    from ..server.pki.ca import load_cert_pem
    from ..server.pki.mtls import ThreadedServer, server_ssl_context
    from ..server.ratelimit import RateLimit
    from ..server.storage import store
    from ..server.storage.blobs import LocalBlobStore
    from ..server.storage.db import Database
    from ..trust.bundle import TrustBundle
    from .sharedclock import SharedClock

    clock = SharedClock.attach(spec.clock_name)
    store.set_clock(clock)
    db = Database(spec.db_url, sqlite_synchronous="NORMAL")
    tls = spec.tls_dir
    settings = ServerSettings(
        ca_cert=load_cert_pem((tls / "ca.pem").read_bytes()),
        # all simulated devices share 127.0.0.1: the per-IP limit would model one NAT, not a
        # fleet; per-device limits stay at their defaults, on simulated time
        ip_rate=RateLimit(rate=1e9, burst=1_000_000_000),
        lastseen_interval=60,
        inline_io=True,  # synchronous=NORMAL, blobs on tmpfs: cheaper than a thread hop
    )
    srv = UpdateServer(
        db,
        LocalBlobStore(spec.blobs),
        settings,
        TrustState(TrustBundle.load(spec.bundle).store()),
        clock=clock.monotonic,
    )
    srv.campaigns.clock = clock
    ctx = server_ssl_context(tls / "server.pem", tls / "server.key", tls / "ca.pem")
    adm_ctx = server_ssl_context(
        tls / "server.pem", tls / "server.key", None, require_client_cert=False
    )
    dev_srv = ThreadedServer(srv.asgi("device"), ctx, sock=socket.socket(fileno=dev_fd))
    # A device's keep-alive connection idles for its poll interval: a few simulated hours,
    # i.e. tens of wall seconds, often past uvicorn's 75 s; keep it (docs/simulator.md).
    dev_srv.server.config.timeout_keep_alive = 24 * 3600
    dev_srv.start()
    adm_srv = None
    if adm_fd is not None:
        adm_srv = ThreadedServer(srv.asgi("admin"), adm_ctx, sock=socket.socket(fileno=adm_fd))
        adm_srv.start()
    sys.stdout.write(json.dumps({"ready": True}) + "\n")
    sys.stdout.flush()
    os.dup2(2, 1)  # nobody reads our stdout any more: anything printed goes to stderr
    with contextlib.suppress(OSError, ValueError):
        while sys.stdin.readline():  # until EOF: the parent closed the pipe (or died)
            pass
    dev_srv.stop()
    if adm_srv is not None:
        adm_srv.stop()
    db.engine.dispose()
    clock.close()


class ServerProcess:
    """Start with :meth:`start`; ``device_url``/``admin_url`` once they listen; :meth:`stop`.

    Each child is ``python -m otaguard.sim.serverproc``: the spec goes in as one JSON line
    on its stdin (with the numbers of the listening sockets it inherited), one JSON line on
    its stdout says it serves, and closing its stdin (or the parent dying) stops it."""

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self._procs: list[subprocess.Popen[bytes]] = []
        self.device_url = ""
        self.admin_url = ""

    def start(self, timeout: float = 60.0) -> ServerProcess:
        from ..server.pki.mtls import bind_socket

        s = self.spec
        if s.procs < 1:
            raise OtaError(ErrorCode.USAGE, f"server processes must be at least 1 ({s.procs})")
        dev_sock = bind_socket("127.0.0.1", 0)
        adm_sock = bind_socket("127.0.0.1", 0)
        try:
            for i in range(s.procs):
                adm_fd = adm_sock.fileno() if i == 0 else None
                fds = (dev_sock.fileno(),) + ((adm_fd,) if adm_fd is not None else ())
                line = json.dumps(
                    {
                        "db_url": s.db_url,
                        "blobs": str(s.blobs),
                        "tls_dir": str(s.tls_dir),
                        "clock_name": s.clock_name,
                        "bundle": s.bundle.hex(),
                        "dev_fd": dev_sock.fileno(),
                        "adm_fd": adm_fd,
                    }
                )
                with sigint_ignored():
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "otaguard.sim.serverproc"],
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        pass_fds=fds,
                    )
                self._procs.append(proc)
                assert proc.stdin is not None
                proc.stdin.write(line.encode() + b"\n")
                proc.stdin.flush()
            for proc in self._procs:
                assert proc.stdout is not None
                ready, _, _ = select.select([proc.stdout], [], [], timeout)
                out = proc.stdout.readline() if ready else b""
                try:
                    ok = json.loads(out)["ready"] is True
                except (ValueError, KeyError, TypeError):
                    ok = False
                if not ok:
                    self.stop()
                    raise OtaError(
                        ErrorCode.INTERNAL,
                        f"simulator server process did not start (exit {proc.returncode})",
                    )
            self.device_url = f"https://127.0.0.1:{dev_sock.getsockname()[1]}"
            self.admin_url = f"https://127.0.0.1:{adm_sock.getsockname()[1]}"
        finally:
            dev_sock.close()  # the children hold the listening sockets now
            adm_sock.close()
        return self

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    def stop(self) -> None:
        procs, self._procs = self._procs, []
        for p in procs:
            with contextlib.suppress(OSError, ValueError):
                assert p.stdin is not None
                p.stdin.close()
        for p in procs:
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.terminate()
                p.wait(5)
            if p.stdout is not None:
                p.stdout.close()


def main() -> None:
    # Ctrl-C in the terminal reaches the whole process group: the simulator handles it (and
    # still writes its partial report), then stops this server by closing our stdin.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raw = json.loads(sys.stdin.readline())
    spec = ServerSpec(
        str(raw["db_url"]),
        Path(raw["blobs"]),
        Path(raw["tls_dir"]),
        str(raw["clock_name"]),
        bytes.fromhex(raw["bundle"]),
    )
    adm_fd = raw.get("adm_fd")
    _serve(spec, int(raw["dev_fd"]), None if adm_fd is None else int(adm_fd))


if __name__ == "__main__":
    main()
