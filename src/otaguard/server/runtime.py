"""Assemble a server from a data directory and run it (``otaguard server run``).

Data directory layout: ``otaguard.db`` (default SQLite database, with SQLite's ``-wal`` and
``-shm`` files and ``otaguard.db-writelock``, the writers' lock file: :mod:`.db`), ``blobs/``
(content-addressed store; with ``[storage] backend = "s3"`` a bucket instead, and ``spool/`` for
uploads on their way to it). The schema is migrated to the newest revision on every start.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path

import uvicorn
from sqlalchemy.engine import make_url

from ..crypto.cose import Signer
from ..crypto.keys import PublicKey
from ..errors import ErrorCode, OtaError, ServerError, UsageError
from ..fsutil import private_file, read_limited
from ..trust.model import KeyResolver, StaticKeys
from .app import UpdateServer
from .context import IpNet, ServerSettings, TrustState
from .dashboard.audit import configure_signing_audit
from .pki.ca import MAX_PEM, load_cert_pem
from .pki.listener import Deadlines
from .pki.mtls import bind_socket, run_loop, server_ssl_context, uvicorn_config
from .pki.renewal import CertIssuer
from .ratelimit import RateLimit
from .sharedlimits import SharedBuckets, SharedProbeDetector, SharedState
from .storage import store
from .storage.blob_settings import STORAGE_KEYS, storage_value
from .storage.blobs import BlobStore, LocalBlobStore
from .storage.db import Database, sqlite_url
from .trustsync import TrustSync
from .workers import (
    DeviceWorker,
    PeerMetrics,
    collect_only,
    fork_device_workers,
    publish,
    reap,
    release,
    stop,
)

log = logging.getLogger("otaguard.server")


@dataclass
class RunOptions:
    data_dir: Path
    ca_cert: Path
    tls_cert: Path | None = None
    tls_key: Path | None = None
    db_url: str | None = None
    host: str = "127.0.0.1"
    port: int = 8443
    admin_host: str = "127.0.0.1"
    admin_port: int = 8444
    workers: int = 1  # processes serving the device listener (server/workers.py)
    trust_bundle: Path | None = None
    trusted_keys: list[Path] = field(default_factory=list)
    trusted_proxies: list[str] = field(default_factory=list)
    proxy_only: bool = False  # plain-HTTP listener behind a TLS-terminating proxy
    device_rate: float = 5.0
    device_burst: int = 30
    ip_rate: float = 200.0
    ip_burst: int = 1000
    # The rotation log's sealing key (loaded by the CLI from --audit-seal-*).
    audit_sealer: Signer | None = None
    # The signing service's audit log (or a copy) and its seal keys, for the dashboard.
    signing_audit_log: Path | None = None
    signing_audit_keys: list[Path] = field(default_factory=list)
    # Signs dashboard sessions (loaded by the CLI from --dashboard-session-key-file): the same
    # on every node of a cluster; None: a key per process.
    session_key: bytes | None = None
    issuer: CertIssuer | None = None  # the fleet CA for certificate renewal (else E_NO_ISSUER)
    header_timeout: float = 10.0  # listener deadlines (server/pki/listener.py)
    body_timeout: float = 30.0
    body_min_rate: int = 16384
    tuf_timestamp_hours: int = 24  # TUF timestamp expiry (server/storage/tufrepo.py)
    tuf_max_targets_days: int = 366  # uploaded TUF targets expiring later: E_POLICY
    # The TUF snapshot/timestamp keys when they are in an HSM (loaded by the CLI from
    # --tuf-snapshot-pkcs11-uri/--tuf-timestamp-pkcs11-uri); None: files in <data>/tuf/keys.
    tuf_online: dict[str, Signer] | None = None
    # The blob store ([storage]): "local" (<data>/blobs) or "s3" (server/blobs_s3.py).
    storage_backend: str | None = None  # None: local
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_prefix: str | None = None


def open_database(data_dir: Path, db_url: str | None) -> Database:
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    if db_url is None:
        private_file(data_dir / "otaguard.db")  # device registry, token hashes: owner only
    db = Database(db_url or sqlite_url(data_dir / "otaguard.db"))
    db.upgrade()
    return db


def storage_options(opts: RunOptions) -> dict[str, str | None]:
    """The blob store's options, checked: E_CONFIG naming the key (and its flag)."""

    values: dict[str, str | None] = {}
    for fld, key in STORAGE_KEYS.items():
        v = getattr(opts, fld)
        flag = "--" + fld.replace("_", "-")
        values[fld] = None if v is None else storage_value(fld, f"{key} ({flag})", v)
    if values["storage_backend"] in (None, "local"):
        given = [STORAGE_KEYS[f] for f, v in values.items() if v and f != "storage_backend"]
        if given:
            raise OtaError(ErrorCode.CONFIG, f'{given[0]} needs storage.backend = "s3"')
    elif values["s3_bucket"] is None:
        raise OtaError(
            ErrorCode.CONFIG, 'storage.s3_bucket (--s3-bucket) is required with backend "s3"'
        )
    return values


def open_blob_store(opts: RunOptions) -> BlobStore:
    """The configured blob store: ``<data>/blobs``, or the bucket (nothing is asked of it
    yet: a server starts while its store is down, and answers 503 E_STORAGE until it is up)."""
    values = storage_options(opts)
    if values["storage_backend"] in (None, "local"):
        return LocalBlobStore(opts.data_dir / "blobs")
    from .storage.blobs_s3 import S3BlobStore  # boto3 only where it is used

    assert values["s3_bucket"] is not None

    return S3BlobStore(
        values["s3_bucket"],
        spool_dir=opts.data_dir / "spool",
        prefix=values["s3_prefix"] or "",
        endpoint_url=values["s3_endpoint_url"],
        region=values["s3_region"],
    )


def load_resolver(bundle: Path | None, keys: list[Path], db: Database) -> KeyResolver | None:
    if bundle is not None and keys:
        raise UsageError(ErrorCode.USAGE, "give a trust bundle or trusted keys, not both")
    if bundle is not None:
        from ..trust.bundle import TrustBundle

        ts = TrustBundle.load(read_limited(bundle, 1 << 20)).store()
        with db.read() as conn:
            published = store.latest_keylist(conn)
        if published is not None and published.version > ts.version:
            # Replay the newest published update on top of the bundle's list (updates carry
            # the complete list, so the newest one is enough).
            ts = ts.apply_update(published.document)
        return ts
    if keys:
        return StaticKeys([PublicKey.from_pem(read_limited(k, MAX_PEM)) for k in keys])
    return None


def share_limits(srv: UpdateServer, db: Database) -> None:
    """Per-device buckets and probe detectors shared by every node on this PostgreSQL
    (server/sharedlimits.py) instead of this process's own."""
    shared = SharedState(db)
    st = srv.settings
    srv.device_buckets = SharedBuckets(shared, st.device_rate)
    srv.probes = SharedProbeDetector(shared, "rate_limit", st.probe_threshold, st.probe_window)
    srv.refusals = SharedProbeDetector(shared, "refusal", st.refusal_threshold, st.refusal_window)


def parse_proxies(values: list[str]) -> tuple[IpNet, ...]:
    try:
        return tuple(ipaddress.ip_network(v, strict=False) for v in values)
    except ValueError as exc:
        raise UsageError(ErrorCode.USAGE, f"bad proxy address: {exc}") from None


def build_server(opts: RunOptions) -> UpdateServer:
    storage = storage_options(opts)  # a bad [storage] value stops the server before it migrates
    if storage["storage_backend"] == "s3":
        log.warning(
            "otaguard server: blobs in s3://%s/%s%s",
            storage["s3_bucket"],
            storage["s3_prefix"] or "",
            f" at {storage['s3_endpoint_url']}" if storage["s3_endpoint_url"] else "",
        )
    if opts.signing_audit_keys and opts.signing_audit_log is None:
        raise UsageError(ErrorCode.USAGE, "--signing-audit-key needs --signing-audit-log")
    db = open_database(opts.data_dir, opts.db_url)
    settings = ServerSettings(
        ca_cert=load_cert_pem(read_limited(opts.ca_cert, MAX_PEM)),
        trusted_proxies=parse_proxies(opts.trusted_proxies),
        device_rate=RateLimit(opts.device_rate, opts.device_burst),
        ip_rate=RateLimit(opts.ip_rate, opts.ip_burst),
        audit_sealer=opts.audit_sealer,
        session_key=opts.session_key,
    )
    if opts.audit_sealer is None:
        log.warning(
            "no audit-sealing key (--audit-seal-pkcs11-uri): the rotation audit log is "
            "hash-chained and anchored in the database, but not sealed"
        )
    resolver = load_resolver(opts.trust_bundle, opts.trusted_keys, db)
    trust = TrustState(resolver)
    srv = UpdateServer(
        db,
        open_blob_store(opts),
        settings,
        trust,
        issuer=opts.issuer,
        data_dir=opts.data_dir,
    )
    # Other nodes on this database publish key lists too: follow them (server/trustsync.py).
    trust.refresh = TrustSync(db, trust, on_campaigns=srv.campaigns.wake).start().refresh
    if db.dialect == "postgresql":
        share_limits(srv, db)
    if opts.signing_audit_log is not None:
        seal_keys = [PublicKey.from_pem(read_limited(k, MAX_PEM)) for k in opts.signing_audit_keys]
        configure_signing_audit(srv, opts.signing_audit_log, seal_keys)
    from .storage.tufrepo import (  # tuf's imports only where a server runs
        DAY,
        TufRepository,
        TufSettings,
    )

    # The TUF repository's online snapshot/timestamp keys are generated here at first start.
    ts_ttl = opts.tuf_timestamp_hours * 3600
    srv.tuf = TufRepository(
        opts.data_dir / "tuf",
        TufSettings(
            timestamp_ttl=ts_ttl,
            snapshot_ttl=max(7 * DAY, 2 * ts_ttl),
            max_targets_validity=opts.tuf_max_targets_days * DAY,
        ),
        online=opts.tuf_online,
    )
    return srv


def listener_deadlines(opts: RunOptions, srv: UpdateServer, listener: str) -> Deadlines:
    return Deadlines(
        header_timeout=opts.header_timeout,
        body_timeout=opts.body_timeout,
        body_min_rate=opts.body_min_rate,
        listener=listener,
        on_expire=srv.deadline_expired,
    )


@dataclass(frozen=True)
class NodeLayout:
    """Where a node listens and how many processes serve its device listener: known before
    any key is loaded (the workers are forked before that, see :mod:`.workers`)."""

    host: str = "127.0.0.1"
    port: int = 8443
    admin_host: str = "127.0.0.1"
    admin_port: int = 8444
    workers: int = 1
    db_url: str | None = None

    @classmethod
    def of(cls, opts: RunOptions) -> NodeLayout:
        return cls(
            opts.host, opts.port, opts.admin_host, opts.admin_port, opts.workers, opts.db_url
        )


def _contexts(opts: RunOptions) -> tuple[ssl.SSLContext | None, ssl.SSLContext | None]:
    """The device and admin listeners' TLS contexts (None: plain HTTP)."""
    if (opts.tls_cert is None or opts.tls_key is None) and not opts.proxy_only:
        raise UsageError(ErrorCode.USAGE, "--tls-cert and --tls-key are required")
    if opts.proxy_only:
        if not opts.trusted_proxies:
            raise UsageError(ErrorCode.USAGE, "--proxy-only needs --trusted-proxy")
        dev_ctx = None
    else:
        assert opts.tls_cert is not None and opts.tls_key is not None
        dev_ctx = server_ssl_context(opts.tls_cert, opts.tls_key, opts.ca_cert)
    adm_ctx = None
    if opts.tls_cert is not None and opts.tls_key is not None:
        adm_ctx = server_ssl_context(opts.tls_cert, opts.tls_key, None, require_client_cert=False)
    return dev_ctx, adm_ctx


def run(opts: RunOptions) -> None:
    """Serve the device API (mTLS) and the admin API (server TLS + tokens) until signalled.
    With ``opts.workers`` above 1 the workers inherit the keys ``opts`` holds open: keys in
    an HSM need :func:`run_node`, which opens them in each process (as the CLI does)."""
    run_node(lambda: opts, NodeLayout.of(opts))


def run_node(load: Callable[[], RunOptions], layout: NodeLayout) -> None:
    """:func:`run` with ``layout.workers`` processes on the device listener; ``load`` builds
    the options (opening keys) in each process, after the workers are forked."""
    if layout.workers > 1:
        dialect = make_url(layout.db_url).get_backend_name() if layout.db_url else "sqlite"
        if dialect != "postgresql":
            raise UsageError(
                ErrorCode.USAGE,
                "--workers above 1 needs PostgreSQL (--db): the processes share per-device "
                "limits there, as the nodes of a cluster do",
            )
    dev_sock = bind_socket(layout.host, layout.port)
    adm_sock = bind_socket(layout.admin_host, layout.admin_port)
    children = fork_device_workers(
        layout.workers - 1,
        lambda _index, sender: _serve_device_worker(load, dev_sock, adm_sock, sender),
    )
    srv: UpdateServer | None = None
    try:
        opts = load()
        srv = build_server(opts)
        dev_ctx, adm_ctx = _contexts(opts)
        dev_dl, adm_dl = (listener_deadlines(opts, srv, part) for part in ("device", "admin"))
        dev = uvicorn.Server(uvicorn_config(srv.asgi("device"), dev_ctx, deadlines=dev_dl))
        adm = uvicorn.Server(uvicorn_config(srv.asgi("admin"), adm_ctx, deadlines=adm_dl))
        if children:
            srv.metrics.peers = PeerMetrics()
            srv.metrics.peers.follow(children)
            release(children)
        dport, aport = dev_sock.getsockname()[1], adm_sock.getsockname()[1]
        log.warning(
            "otaguard server: devices on %s:%d (%d process%s), admin on %s:%d",
            layout.host,
            dport,
            layout.workers,
            "es" if layout.workers > 1 else "",
            layout.admin_host,
            aport,
        )
        print(
            f"listening device={layout.host}:{dport} admin={layout.admin_host}:{aport}",
            flush=True,
        )
        failed: list[DeviceWorker] = []

        async def supervise() -> None:
            while not (dev.should_exit or adm.should_exit):
                await asyncio.sleep(0.2)
                gone = reap(children)
                if gone is not None:
                    failed.append(gone)
                    dev.should_exit = adm.should_exit = True

        async def main() -> None:
            await asyncio.gather(
                dev.serve(sockets=[dev_sock]), adm.serve(sockets=[adm_sock]), supervise()
            )

        run_loop(main())
        if failed:
            raise ServerError(
                ErrorCode.INTERNAL,
                f"device worker {failed[0].index} exited with status {failed[0].exit_status}:"
                " this node stopped",
                500,
            )
    finally:
        stop(children)
        if srv is not None:
            from .admin_api.rotation import close_audit_log

            close_audit_log(srv)


def _serve_device_worker(
    load: Callable[[], RunOptions],
    dev_sock: socket.socket,
    adm_sock: socket.socket,
    sender: Connection,
) -> None:
    """A forked worker: the device listener only, its counters sent to the first process."""
    adm_sock.close()
    opts = load()
    srv = build_server(opts)
    dev_ctx, _ = _contexts(opts)
    dl = listener_deadlines(opts, srv, "device")
    dev = uvicorn.Server(uvicorn_config(srv.asgi("device"), dev_ctx, deadlines=dl))

    async def main() -> None:
        task = asyncio.create_task(publish(collect_only(srv.metrics.own), sender))
        try:
            await dev.serve(sockets=[dev_sock])
        finally:
            task.cancel()

    run_loop(main())
