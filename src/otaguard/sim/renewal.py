"""Certificate-renewal simulation: a fleet on short certificates, run over several lifetimes.

The question it answers is the one issue #16 asks: does a fleet that nobody touches keep a
working identity forever? Each device is the real renewal flow (:class:`~..device.renewal.
CertRenewal`, the one the updater runs) on the real HTTPS client, against the real update
server (:class:`~..server.app.UpdateServer` under uvicorn, mTLS on 127.0.0.1, SQLite, the
fleet CA as issuer), on one simulated clock shared by devices, server and store. Certificates
get lifetimes of simulated hours, so several lifetimes pass in seconds of wall time.

Devices poll at jittered intervals, some go offline for a while (shorter than the renewal
window: a device offline for the whole window cannot renew, which is what the expiring-
certificates listing is for), and some lose power in the middle of a renewal — before the
new certificate is stored, after it is stored, or after the server already saw it used but
before the device committed it. A device is *locked out* when the server refuses its
identity (expired, superseded, revoked) and the device has nothing else to present; the run
passes when no device is.

Certificate validity is judged on the simulated clock: the server's TLS context skips
OpenSSL's wall-clock check of client certificates (``X509_V_FLAG_NO_CHECK_TIME``, here only)
and the server refuses expired certificates itself from the database row (E_CERT_EXPIRED),
as it does in production.
"""

from __future__ import annotations

import datetime as dt
import heapq
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from ..clock import SimClock
from ..device.https_transport import HttpsTransport
from ..device.renewal import CERT_REFUSALS, CertRenewal
from ..device.storage import Identity
from ..errors import ErrorCode, OtaError, PowerCut, UsageError
from ..fsutil import atomic_write
from ..server.app import UpdateServer
from ..server.context import ServerSettings
from ..server.pki.ca import FleetCA
from ..server.pki.enroll import enroll_device, issue_server_cert
from ..server.pki.mtls import ThreadedServer, server_ssl_context
from ..server.pki.renewal import CertIssuer
from ..server.ratelimit import RateLimit
from ..server.storage import store
from ..server.storage.blobs import LocalBlobStore
from ..server.storage.db import Database, sqlite_url

NO_CHECK_TIME = 0x200000  # X509_V_FLAG_NO_CHECK_TIME (OpenSSL >= 1.1.0)
CRASH_POINTS = ("before_store", "after_store", "before_commit")


@dataclass(frozen=True)
class RenewalSimOptions:
    devices: int = 20
    lifetime: int = 12 * 3600  # simulated seconds per certificate
    lifetimes: float = 2.5  # how long to run, in lifetimes (> 2 for the acceptance run)
    fraction: float = 1 / 3  # renew with less than this much of the lifetime left
    poll_interval: int = 1800  # mean simulated seconds between polls (+-50 % jitter)
    outage_rate: float = 0.3  # share of devices offline once, for up to half the window
    crash_rate: float = 0.3  # chance that a renewal loses power at one of CRASH_POINTS
    seed: int = 1
    issuer: bool = True  # False: a server that cannot renew (the control: the fleet locks out)

    def check(self) -> None:
        if not 1 <= self.devices <= 2000:
            raise UsageError(ErrorCode.USAGE, "devices: 1..2000")
        if self.lifetime < 600 or not 0 < self.fraction < 1:
            raise UsageError(ErrorCode.USAGE, "lifetime >= 600 s and 0 < fraction < 1")
        if not 0 < self.lifetimes <= 50:
            raise UsageError(ErrorCode.USAGE, "lifetimes: (0, 50]")
        if not 0.0 <= self.outage_rate <= 1.0 or not 0.0 <= self.crash_rate <= 1.0:
            raise UsageError(ErrorCode.USAGE, "outage and crash rates: [0, 1]")
        window = self.fraction * self.lifetime
        if not 60 <= self.poll_interval <= window / 3:
            raise UsageError(
                ErrorCode.USAGE,
                f"poll interval: 60 s .. a third of the renewal window ({window / 3:.0f} s)",
            )


class MemoryIdentityStore:
    """The device's secure storage for its identity: each write lands whole or not at all (as
    :class:`~..device.storage.SecureStorage` guarantees); a power cut can be armed to hit
    just before or just after the n-th write."""

    def __init__(self, ident: Identity) -> None:
        self._ident = ident
        self._cut: tuple[int, str] | None = None

    def arm(self, nth_write: int, when: str) -> None:
        self._cut = (nth_write, when)

    def disarm(self) -> None:
        self._cut = None

    def identity(self) -> Identity | None:
        return self._ident

    def write_identity(self, ident: Identity) -> None:
        cut = self._cut
        if cut is not None and cut[0] == 1 and cut[1] == "before":
            self._cut = None
            raise PowerCut(ErrorCode.POWER_CUT, "power cut before the identity write")
        self._ident = ident
        if cut is not None and cut[0] == 1:
            self._cut = None
            raise PowerCut(ErrorCode.POWER_CUT, "power cut after the identity write")
        if cut is not None:
            self._cut = (cut[0] - 1, cut[1])


@dataclass
class SimDevice:
    serial: str
    dir: Path
    store: MemoryIdentityStore
    outage: tuple[float, float] | None
    transport: HttpsTransport | None = None
    renewal: CertRenewal | None = None
    locked_out: str | None = None
    crashes: int = 0
    polls: int = 0


@dataclass
class RenewalReport:
    devices: int
    lifetime_s: int
    simulated_s: float
    lifetimes: float
    renewals: int  # renewed identities committed
    crashes: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    refused: int = 0
    polls: int = 0
    unreachable_polls: int = 0
    locked_out: list[str] = field(default_factory=list)
    final_checkin_failures: list[str] = field(default_factory=list)
    max_expiring_listed: int = 0  # most devices the expiring listing showed at one time
    wall_s: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.locked_out and not self.final_checkin_failures

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


class _World:
    def __init__(self, opts: RenewalSimOptions, work: Path, clock: SimClock) -> None:
        self.opts = opts
        self.work = work
        self.clock = clock
        ca_pass = b"renewal-sim-ca"
        self.ca = FleetCA.create(work / "ca", passphrase=ca_pass)
        issue_server_cert(
            self.ca, work / "tls", dns_names=["localhost"], ip_addresses=["127.0.0.1"]
        )
        self.ca_pem = work / "tls" / "ca.pem"
        atomic_write(self.ca_pem, self.ca.cert.public_bytes(serialization.Encoding.PEM))
        self.db = Database(sqlite_url(work / "server.db"))
        self.db.upgrade()
        settings = ServerSettings(
            ca_cert=self.ca.cert,
            device_rate=RateLimit(rate=1000.0, burst=1000),
            ip_rate=RateLimit(rate=100000.0, burst=100000),
            refusal_threshold=1000,
            poll_interval=opts.poll_interval,
        )
        self.srv = UpdateServer(
            self.db,
            LocalBlobStore(work / "blobs"),
            settings,
            clock=clock.monotonic,
            issuer=CertIssuer(self.ca, opts.lifetime) if opts.issuer else None,
        )
        ctx = server_ssl_context(
            work / "tls" / "server.pem", work / "tls" / "server.key", self.ca_pem
        )
        ctx.verify_flags |= NO_CHECK_TIME  # validity is the server's check on the sim clock
        self.server = ThreadedServer(self.srv.asgi("device"), ctx).start()

    def close(self) -> None:
        self.server.stop()
        self.db.dispose()


def _boot(w: _World, d: SimDevice) -> None:
    """Power-on: the TLS client is built from the identity in storage (the current one)."""
    ident = d.store.identity()
    assert ident is not None
    cert, key = d.dir / "device.pem", d.dir / "device.key"
    atomic_write(key, ident.device_key, mode=0o600)
    atomic_write(cert, ident.certificate)
    if d.transport is not None:
        d.transport.close()
    d.transport = HttpsTransport(
        w.server.url,
        ca_file=w.ca_pem,
        cert_file=cert,
        key_file=key,
        max_attempts=1,
        keepalive_expiry=None,
    )
    counts = d.renewal.counts if d.renewal is not None else None
    d.renewal = CertRenewal(d.store, d.transport, fraction=w.opts.fraction, clock=w.clock)
    if counts is not None:  # the run's tally survives the reboot (the device's RAM does not)
        d.renewal.counts = counts


def _checkin(d: SimDevice) -> None:
    assert d.transport is not None and d.renewal is not None
    t = d.transport
    d.renewal.checkin(lambda: t.checkin({"serial": d.serial, "version": "1.0.0"}))


def _poll(w: _World, d: SimDevice, rng: random.Random, rep: RenewalReport) -> None:
    """One poll: check in (pending identity first), renew if due and use the new identity.
    The same steps as :meth:`~..device.updater.Updater.poll_once` around its install step."""
    assert d.renewal is not None
    d.polls += 1
    rep.polls += 1
    try:
        _checkin(d)
        if d.renewal.due() and rng.random() < w.opts.crash_rate:
            point = rng.choice(CRASH_POINTS)
            rep.crashes[point] = rep.crashes.get(point, 0) + 1
            d.crashes += 1
            # Writes of a renewal: 1 stores the pending identity, 2 commits it.
            d.store.arm(*{"before_store": (1, "before"), "after_store": (1, "after"),
                          "before_commit": (2, "before")}[point])  # fmt: skip
        if d.renewal.renew_if_due():
            _checkin(d)
    except PowerCut:
        _boot(w, d)
    except OtaError as err:
        if err.code in CERT_REFUSALS:
            d.locked_out = f"{err.code.value} at t+{w.clock.monotonic():.0f}s: {err.detail}"
        else:
            rep.unreachable_polls += 1
    d.store.disarm()


def run_renewal_sim(opts: RenewalSimOptions, work: Path) -> RenewalReport:
    """Run the simulation in ``work`` (created; its contents are scratch)."""
    opts.check()
    wall = time.monotonic()
    rng = random.Random(opts.seed)
    work.mkdir(parents=True, exist_ok=True)
    start = float(int(time.time()))
    clock = SimClock(start)
    prev_clock = store.set_clock(clock)
    w: _World | None = None
    try:
        w = _World(opts, work, clock)
        window = opts.fraction * opts.lifetime
        end = opts.lifetimes * opts.lifetime
        devices: list[SimDevice] = []
        for i in range(opts.devices):
            serial = f"RN-{i:05d}"
            # Enrolled at different moments of a first lifetime: renewals spread out.
            nb = start - rng.uniform(0, 0.6) * opts.lifetime
            ddir = work / "devices" / serial
            enr = enroll_device(
                w.ca,
                w.db,
                serial=serial,
                model="renewal-sim",
                hw_rev="r1",
                groups=[],
                out_dir=ddir,
                not_before=dt.datetime.fromtimestamp(nb, dt.UTC),
                not_after=dt.datetime.fromtimestamp(nb + opts.lifetime, dt.UTC),
            )
            assert enr.key_path is not None
            ident = Identity(enr.key_path.read_bytes(), enr.cert_path.read_bytes())
            outage = None
            if rng.random() < opts.outage_rate:
                length = rng.uniform(0.1, 0.5) * window
                at = rng.uniform(0, max(1.0, end - length))
                outage = (at, at + length)
            d = SimDevice(serial, ddir, MemoryIdentityStore(ident), outage)
            _boot(w, d)
            devices.append(d)
        rep = RenewalReport(opts.devices, opts.lifetime, end, opts.lifetimes, 0)
        queue = [(rng.uniform(0, opts.poll_interval), i) for i in range(len(devices))]
        heapq.heapify(queue)
        next_listing = 0.0
        while queue and queue[0][0] < end:
            at, i = heapq.heappop(queue)
            clock.set(start + at)
            if at >= next_listing:
                with w.db.read() as conn:
                    listed = store.certs_expiring(conn, int(start + at + window))
                rep.max_expiring_listed = max(rep.max_expiring_listed, len(listed))
                next_listing = at + opts.poll_interval
            d = devices[i]
            if d.locked_out is None and not (d.outage and d.outage[0] <= at < d.outage[1]):
                _poll(w, d, rng, rep)
            heapq.heappush(queue, (at + opts.poll_interval * rng.uniform(0.5, 1.5), i))
        clock.set(start + end)
        for d in devices:  # every device must still get in at the end
            if d.locked_out is not None:
                rep.locked_out.append(f"{d.serial}: {d.locked_out}")
                continue
            try:
                _checkin(d)
            except OtaError as err:
                rep.final_checkin_failures.append(f"{d.serial}: {err.code.value}")
        for d in devices:
            assert d.renewal is not None
            rep.renewals += d.renewal.counts.committed
            rep.dropped += d.renewal.counts.dropped
            rep.refused += d.renewal.counts.refused
            if d.transport is not None:
                d.transport.close()
        rep.wall_s = round(time.monotonic() - wall, 2)
        return rep
    finally:
        if w is not None:
            w.close()
        store.set_clock(prev_clock)


def clean(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
