"""The simulator's update server in its own process (its own GIL: the second core).

The server is stateless apart from its database and blob store, so the simulator prepares
those (schema, CA, TLS certificates, enrolled devices) in its own process and then starts
this child, which serves the device API (mTLS) and the admin API (TLS + bearer tokens) with
:class:`~otaguard.server.mtls.ThreadedServer` exactly as in-process, on the simulator's
:class:`~.sharedclock.SharedClock` (rate limiter, probe detector, campaign engine and store
timestamps all read it). The parent talks to it only over HTTPS (devices, admin API) and the
shared database; pipes carry the listening URLs back and the stop request in.
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


@dataclass(frozen=True)
class ServerSpec:
    db_url: str
    blobs: Path
    tls_dir: Path  # server.pem, server.key, ca.pem
    clock_name: str  # SharedClock block
    bundle: bytes  # the trust bundle releases are checked against


def _serve(spec: ServerSpec) -> None:
    from ..server import store
    from ..server.app import ServerSettings, TrustState, UpdateServer
    from ..server.blobs import LocalBlobStore
    from ..server.ca import load_cert_pem
    from ..server.db import Database
    from ..server.mtls import ThreadedServer, server_ssl_context
    from ..server.ratelimit import RateLimit
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
    dev_srv = ThreadedServer(srv.asgi("device"), ctx)
    # A device's keep-alive connection idles for its poll interval: a few simulated hours,
    # i.e. tens of wall seconds, often past uvicorn's 75 s; keep it (docs/simulator.md).
    dev_srv.server.config.timeout_keep_alive = 24 * 3600
    dev_srv.start()
    adm_srv = ThreadedServer(srv.asgi("admin"), adm_ctx).start()
    sys.stdout.write(json.dumps({"device": dev_srv.url, "admin": adm_srv.url}) + "\n")
    sys.stdout.flush()
    os.dup2(2, 1)  # nobody reads our stdout any more: anything printed goes to stderr
    with contextlib.suppress(OSError, ValueError):
        while sys.stdin.readline():  # until EOF: the parent closed the pipe (or died)
            pass
    dev_srv.stop()
    adm_srv.stop()
    db.engine.dispose()
    clock.close()


class ServerProcess:
    """Start with :meth:`start`; ``device_url``/``admin_url`` once it listens; :meth:`stop`.

    The child is ``python -m otaguard.sim.serverproc``: the spec goes in as one JSON line on
    its stdin, the URLs come back as one JSON line on its stdout, and closing its stdin (or
    the parent dying) stops it."""

    def __init__(self, spec: ServerSpec) -> None:
        self.spec = spec
        self._proc: subprocess.Popen[bytes] | None = None
        self.device_url = ""
        self.admin_url = ""

    def start(self, timeout: float = 60.0) -> ServerProcess:
        s = self.spec
        line = json.dumps(
            {
                "db_url": s.db_url,
                "blobs": str(s.blobs),
                "tls_dir": str(s.tls_dir),
                "clock_name": s.clock_name,
                "bundle": s.bundle.hex(),
            }
        )
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "otaguard.sim.serverproc"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(line.encode() + b"\n")
        self._proc.stdin.flush()
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout)
        out = self._proc.stdout.readline() if ready else b""
        try:
            urls = json.loads(out)
            self.device_url, self.admin_url = str(urls["device"]), str(urls["admin"])
        except (ValueError, KeyError, TypeError):
            self.stop()
            raise OtaError(
                ErrorCode.INTERNAL,
                f"simulator server process did not start (exit {self._proc.returncode})",
            ) from None
        return self

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def stop(self) -> None:
        p = self._proc
        if p is None:
            return
        with contextlib.suppress(OSError, ValueError):
            assert p.stdin is not None
            p.stdin.close()
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
    _serve(spec)


if __name__ == "__main__":
    main()
