"""The devices' side of the fleet simulation: device runtimes on the real HTTPS client, with
what the simulated network does to them, run in shards of the fleet.

The event loop (:mod:`.runner`) decides *when* a device polls; a shard owns a subset of the
devices (device ``idx`` belongs to shard ``idx % shards``) and runs their polls on its own
threads. With one shard it runs in the simulator's process (:class:`LocalShard`); with more,
each shard is a child process (:class:`ProcessShard`), because the device runtimes are Python
and one interpreter's lock held the whole fleet to one core while the server processes waited
for it (docs/simulator.md, "Time and processes"). A shard reads the same
:class:`~.sharedclock.SharedClock` as the server; what crosses the pipe is small: a poll
request (device, instant) out, the poll's outcome and the device's new status back.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import random
import resource
import signal
import threading
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import partial
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Protocol

from ..device.bootloader import BootResult
from ..device.device import Device
from ..device.faults import FaultInjector, FaultPlan
from ..device.https_transport import HttpsTransport
from ..device.updater import PollResult, Updater
from ..errors import DeviceError, ErrorCode, OtaError, PowerCut
from . import world as W
from .children import sigint_deferred, sigint_ignored
from .model import TRANSPORT_ATTACKS, Link, SimOptions
from .sharedclock import SharedClock

SETUP_WORKERS = 32  # threads per shard for the fleet's first check-ins (setup only)
TRANSIENT = {ErrorCode.TRANSPORT.value, ErrorCode.POWER_CUT.value, ErrorCode.RATE_LIMIT.value}


@dataclass(frozen=True)
class AttackKit:
    old_manifest: bytes
    other_manifest: bytes
    other_image: bytes


@dataclass(frozen=True)
class ShardConfig:
    """What a shard needs to run its devices (sent to a child process at its start)."""

    url: str
    ca_pem: Path
    clock_name: str
    opts: SimOptions
    kit: AttackKit
    patch_len: int
    keylist_target: int
    t0: float
    workers: int  # device threads of this shard
    fd_cap: int  # keep-alive connections this shard may hold open
    # SPKI SHA-256 pins of the update server (empty: the CA check alone)
    spki_pins: tuple[str, ...] = ()


@dataclass(frozen=True)
class DeviceSpec:
    """One device handed to its shard: its files, link, random stream and fate."""

    idx: int
    files: W.DeviceFiles
    link: Link
    poll_seed: int  # seeds the device's random stream for its polls (drawn from its fate)
    selftest_fail: bool
    attack: str | None


@dataclass
class DeviceStatus:
    """What the event loop keeps of a device between its polls (a shard sends it back with
    every poll's outcome)."""

    patched_at: float | None = None
    keylist_at: float | None = None
    reached: bool = False
    version: str = W.V_OLD
    keylist_version: int = 1
    attack: str | None = None


PollOutcome = tuple[float, dict[str, Any], DeviceStatus]


class SimTransport:
    """The device's HTTPS client plus what the simulated network does to it for one poll:
    a dropped download, or an attacker substituting what the device receives."""

    def __init__(self, pool: ConnectionPool, idx: int, kit: AttackKit) -> None:
        self.pool = pool
        self.idx = idx
        self.kit = kit
        self.attack: str | None = None
        self.drop_at: int | None = None
        self.drops = 0  # links dropped under a download this poll (the updater may resume)
        self.bytes: Counter[str] = Counter()

    @property
    def inner(self) -> HttpsTransport:
        return self.pool.get(self.idx)

    @property
    def last_checkin(self) -> dict[str, Any] | None:
        return self.inner.last_checkin

    @last_checkin.setter
    def last_checkin(self, value: dict[str, Any] | None) -> None:
        self.inner.last_checkin = value

    @property
    def endpoint(self) -> str:
        return self.inner.endpoint

    def checkin(self, facts: dict[str, Any] | None = None) -> dict[str, Any] | None:
        return self.inner.checkin(facts)

    def keylist(self, etag: str | None = None) -> tuple[bytes, str] | None:
        return self.inner.keylist(etag)

    def report(self, event: dict[str, Any]) -> None:
        self.inner.report(event)

    def fetch_manifest(self) -> bytes:
        if self.attack == "replay":
            self.inner.fetch_manifest()  # the genuine request still happens on the wire
            return self.kit.old_manifest
        if self.attack == "cross-model":
            return self.kit.other_manifest
        return self.inner.fetch_manifest()

    def fetch_delta_manifest(self) -> bytes | None:
        if self.attack in ("replay", "cross-model"):
            return None
        return self.inner.fetch_delta_manifest()

    def open_image(self, offset: int) -> Iterator[bytes]:
        if self.attack == "cross-model":
            return self._count("full", iter([self.kit.other_image[offset:]]))
        return self._count("full", self.inner.open_image(offset))

    def open_patch(self, offset: int) -> Iterator[bytes]:
        return self._count("delta", self.inner.open_patch(offset))

    def _count(self, kind: str, it: Iterator[bytes]) -> Iterator[bytes]:
        pos = 0
        for chunk in it:
            if self.attack == "tamper" and pos == 0 and chunk:
                b = bytearray(chunk)
                b[len(b) // 2] ^= 0x01
                chunk = bytes(b)
            if self.drop_at is not None and pos + len(chunk) > self.drop_at:
                keep = max(0, self.drop_at - pos)
                self.drop_at = None
                self.drops += 1
                if keep:
                    self.bytes[kind] += keep
                    yield chunk[:keep]
                raise DeviceError(ErrorCode.TRANSPORT, "simulated link drop")
            pos += len(chunk)
            self.bytes[kind] += len(chunk)
            yield chunk


class ConnectionPool:
    """Each device's HTTPS client (its TLS context: pinned CA, its own key and certificate,
    built once, as a device keeps it in RAM) with at most ``cap`` keep-alive connections
    open at a time, so a 14,000-device fleet stays within the file-descriptor limit. A device
    whose connection was closed makes a new one (a full TLS handshake) at its next poll.

    Which connection to close: devices poll periodically, so the device that has just
    finished its poll is the one whose next use is furthest away (Belady's choice, where
    least-recently-used would close exactly the connection needed next). Over the cap, the
    releasing device's own connection is closed; least recently used otherwise."""

    def __init__(self, cap: int, make: Callable[[int], HttpsTransport]) -> None:
        self.cap = max(1, cap)
        self._make = make
        self._clients: dict[int, HttpsTransport] = {}
        self._open: OrderedDict[int, None] = OrderedDict()  # devices with a live connection
        self._busy: Counter[int] = Counter()
        self._lock = threading.Lock()
        self.evicted = 0

    def acquire(self, idx: int) -> None:
        with self._lock:
            self._busy[idx] += 1
            self._open[idx] = None  # it is about to use (or open) its connection
            self._open.move_to_end(idx)

    def release(self, idx: int) -> None:
        with self._lock:
            self._busy[idx] -= 1
            if self._busy[idx] <= 0:
                del self._busy[idx]
            if len(self._open) > self.cap and idx not in self._busy and idx in self._open:
                del self._open[idx]
                t = self._clients.get(idx)
                if t is not None:
                    self.evicted += 1
                    t.close()  # the client (and its TLS context) stays: it reconnects
            for t in self._victims():  # under the lock: no poll can start on it meanwhile
                t.close()

    def get(self, idx: int) -> HttpsTransport:
        t = self._clients.get(idx)
        if t is not None:
            return t
        t = self._make(idx)  # outside the lock: building the TLS context takes a while
        with self._lock:
            return self._clients.setdefault(idx, t)

    def _victims(self) -> list[HttpsTransport]:
        out: list[HttpsTransport] = []
        excess = len(self._open) - self.cap
        if excess <= 0:
            return out
        keys: list[int] = []
        for k in self._open:  # oldest first; stop as soon as enough are found
            if not self._busy.get(k):
                keys.append(k)
                if len(keys) >= excess:
                    break
        for k in keys:
            del self._open[k]
            t = self._clients.get(k)
            if t is not None:
                out.append(t)
                self.evicted += 1
        return out

    def close_all(self) -> None:
        with self._lock:
            items = list(self._clients.values())
            self._clients.clear()
            self._open.clear()
        for t in items:
            t.close()


def device_transport(cfg: ShardConfig, files: W.DeviceFiles, i: int) -> HttpsTransport:
    """Device ``i``'s HTTPS client: mTLS with its own certificate, the fleet CA, and the
    server's SPKI pin when the fleet has one (a server certificate with another key, even one
    the same CA issued, is E_CERT on every new connection)."""
    return HttpsTransport(
        cfg.url,
        ca_file=cfg.ca_pem,
        cert_file=files.cert,
        key_file=files.key,
        spki_pins=set(cfg.spki_pins) or None,
        max_attempts=2,
        sleep=lambda s: None,
        rng=random.Random(i),
        timeout=60,
        # the connection idles for a poll interval (tens of wall seconds): keep it, as the
        # server process does (the default drops it after 5 s: a handshake per poll)
        keepalive_expiry=None,
    )


def raise_fd_limit(need: int) -> int:
    """Raise the open-files limit towards ``need``: the soft limit up to the hard one, and
    the hard one too where that is permitted (root); the limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    inf = resource.RLIM_INFINITY
    if soft == inf:
        return 1 << 20
    if hard != inf and hard < need:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (need, need))
            return need
        except (ValueError, OSError):
            pass
    want = hard if hard != inf else max(soft, need)
    if want > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
            soft = want
        except (ValueError, OSError):
            pass
    return int(soft)


@dataclass
class SimDevice:
    idx: int
    files: W.DeviceFiles
    link: Link
    rng: random.Random
    dev: Device
    transport: SimTransport
    updater: Updater
    selftest_fail: bool = False
    status: DeviceStatus = field(default_factory=DeviceStatus)


class DeviceRuntime:
    """The devices of one shard: power-on, first check-in, and one poll at a time each."""

    def __init__(self, cfg: ShardConfig, clock: SharedClock) -> None:
        self.cfg = cfg
        self.opts = cfg.opts
        self.clock = clock
        self.pool = ConnectionPool(cfg.fd_cap, self._transport)
        self.devices: dict[int, SimDevice] = {}

    def add(self, spec: DeviceSpec) -> None:
        """Power the device on (the bootloader verifies and boots) and check in once: the
        fleet was in service before the release, so the server knows what each device runs."""
        rng = random.Random(spec.poll_seed)
        dev = W.open_device(spec.files, self.clock)
        dev.boot()
        dev.flash.park()
        tr = SimTransport(self.pool, spec.idx, self.cfg.kit)
        sd = SimDevice(spec.idx, spec.files, spec.link, rng, dev, tr, None)  # type: ignore[arg-type]
        sd.selftest_fail = spec.selftest_fail
        sd.status.attack = spec.attack
        sd.updater = self._updater(sd)
        self.devices[spec.idx] = sd
        self.pool.acquire(sd.idx)
        try:
            tr.checkin(sd.updater.facts())
        finally:
            self.pool.release(sd.idx)
            sd.dev.flash.park()

    def _transport(self, i: int) -> HttpsTransport:
        return device_transport(self.cfg, self.devices[i].files, i)

    def _updater(self, sd: SimDevice) -> Updater:
        def self_test(_boot: BootResult) -> bool:
            if sd.selftest_fail:
                sd.selftest_fail = False  # a flaky sensor at first boot: passes next time
                return False
            return True

        # keep_state: the device keeps what it verified at power-on in RAM between polls
        return Updater(sd.dev, sd.transport, clock=self.clock, self_test=self_test, keep_state=True)

    def poll(self, idx: int, t: float) -> PollOutcome:
        """One poll of device ``idx`` at simulated instant ``t``: (when it polls next, what
        happened, its status now)."""
        sd = self.devices[idx]
        nxt, ev = self._poll(sd, t)
        # a copy: in-process, the event loop keeps it while the device polls on
        return nxt, ev, replace(sd.status)

    def _poll(self, sd: SimDevice, t: float) -> tuple[float, dict[str, Any]]:
        o = self.opts
        st = sd.status
        ev: dict[str, Any] = {}
        if not sd.link.online(o.profile, t - self.cfg.t0, t, sd.rng):
            ev["offline"] = True
            return sd.link.next_poll(t, sd.rng), ev
        tr = sd.transport
        tr.bytes.clear()
        tr.drops = 0
        pending = st.patched_at is None
        if pending and st.attack is not None:
            tr.attack = st.attack
        if pending and sd.rng.random() < o.profile.drop_rate:
            tr.drop_at = sd.rng.randrange(1, max(2, self.cfg.patch_len))
        faults = sd.dev.flash.faults
        if pending and sd.rng.random() < o.powercut_rate:
            n_ops = o.image_size // 1024 + o.image_size // 4096 + 64
            faults.plan = FaultPlan(
                cut_at_op=faults.ops + sd.rng.randrange(n_ops),
                mode=sd.rng.choice(("before", "torn", "after")),
            )
            faults.fired = False
        res: PollResult | None = None
        self.pool.acquire(sd.idx)
        try:
            res = sd.updater.poll_once()
        except PowerCut:
            ev["power_cut"] = True
        except OtaError as err:
            ev["crash"] = err.code.value
        except Exception as exc:  # a device-side bug must not end the run
            ev["crash"] = type(exc).__name__
        finally:
            self.pool.release(sd.idx)
            attack, tr.attack = tr.attack, None
            tr.drop_at = None
            faults.plan = None
            sd.dev.flash.park()
        ev["bytes"] = dict(tr.bytes)
        ev["drops"] = tr.drops
        ev["drift"] = self.clock.now() - t
        transfer = sum(tr.bytes.values()) / sd.link.bandwidth
        done = t + transfer
        if "power_cut" in ev or "crash" in ev:
            self._reboot(sd)
            if attack is not None:
                ev["attack"] = (attack, "interrupted")
            return done + sd.rng.uniform(60, 600), ev
        assert res is not None
        ev["outcome"] = res.outcome
        ev["error"] = res.error
        if res.outcome != "unreachable":
            st.reached = True
        if attack is not None:
            if res.outcome == "confirmed":
                ev["attack"] = (attack, "ACCEPTED")
            elif res.error is not None and res.offered is not None:
                ev["attack"] = (attack, res.error)
                st.attack = None  # the attacker had its go; the next poll is genuine
        st.version = res.version
        st.keylist_version = res.keylist_version
        if res.keylist_from is not None and st.keylist_at is None:
            st.keylist_at = t
        if st.keylist_at is None and res.keylist_version >= self.cfg.keylist_target:
            st.keylist_at = t
        if res.version == W.V_NEW and st.patched_at is None:
            st.patched_at = done
        if res.error in TRANSIENT or res.outcome in ("failed", "reverted"):
            return done + sd.rng.uniform(600, 1800), ev  # retry soon after a failure
        return sd.link.next_poll(done, sd.rng), ev

    def _reboot(self, sd: SimDevice) -> None:
        """Power comes back: a new Device on the same flash (the bootloader runs again)."""
        sd.dev.close()
        sd.dev = W.open_device(sd.files, self.clock, FaultInjector())
        sd.dev.flash.park()
        sd.updater = self._updater(sd)

    def close(self) -> None:
        devices, self.devices = self.devices, {}
        for sd in devices.values():
            sd.dev.close()
        self.pool.close_all()


class Shard(Protocol):
    def add(self, specs: list[DeviceSpec]) -> Future[None]: ...
    def poll(self, idx: int, t: float) -> Future[PollOutcome]: ...
    def close(self) -> None: ...


def _all_of(futs: list[Future[None]]) -> Future[None]:
    """One future for many: done when all are, with the first failure if any."""
    out: Future[None] = Future()
    left = [len(futs)]
    lock = threading.Lock()

    def one(f: Future[None]) -> None:
        with lock:
            left[0] -= 1
            last = left[0] == 0
        exc = _failure(f)
        if exc is not None and not out.done():
            out.set_exception(exc)
        elif last and not out.done():
            out.set_result(None)

    if not futs:
        out.set_result(None)
    for f in futs:
        f.add_done_callback(one)
    return out


def _failure(f: Future[Any]) -> BaseException | None:
    """A done future's exception; a cancelled one (its shard closing) counts as failed."""
    if f.cancelled():
        return OtaError(ErrorCode.INTERNAL, "cancelled: the simulator shard is closing")
    return f.exception()


class _Threads:
    """A runtime and its poll and setup threads (in this process or a shard's)."""

    def __init__(self, cfg: ShardConfig, clock: SharedClock) -> None:
        self.rt = DeviceRuntime(cfg, clock)
        self.polls = ThreadPoolExecutor(max_workers=cfg.workers, thread_name_prefix="poll")
        # More threads for setup: a first check-in is mostly a TLS handshake, i.e. waiting
        # on the server, and there is nothing else to run meanwhile.
        self.setup = ThreadPoolExecutor(
            max_workers=max(cfg.workers, SETUP_WORKERS), thread_name_prefix="setup"
        )

    def add(self, specs: list[DeviceSpec]) -> Future[None]:
        return _all_of([self.setup.submit(self.rt.add, s) for s in specs])

    def poll(self, idx: int, t: float) -> Future[PollOutcome]:
        return self.polls.submit(self.rt.poll, idx, t)

    def close(self) -> None:
        """Running work finishes; queued work (after Ctrl-C: devices still to set up) is
        cancelled rather than waited for."""
        self.setup.shutdown(wait=True, cancel_futures=True)
        self.polls.shutdown(wait=True, cancel_futures=True)
        self.rt.close()  # idempotent


class LocalShard(_Threads):
    """The whole fleet in the simulator's own process (``SimOptions.sim_procs`` = 1)."""


class ProcessShard:
    """A shard in a child process (``python -m multiprocessing`` spawn: a fresh interpreter,
    nothing inherited but the config). Requests carry a sequence number; a reader thread
    resolves each request's future when the child answers. If the child dies, every pending
    and later request fails with E_INTERNAL instead of waiting forever."""

    def __init__(self, cfg: ShardConfig, name: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=True)
        self._proc = ctx.Process(target=shard_main, args=(child, cfg), name=name, daemon=True)
        with sigint_ignored():
            self._proc.start()
        child.close()
        self._lock = threading.Lock()  # pending requests
        self._send_lock = threading.Lock()  # one message at a time into the pipe
        self._pending: dict[int, Future[Any]] = {}
        self._seq = 0
        self._dead: str | None = None
        self._reader = threading.Thread(target=self._read, name=f"{name}-reader", daemon=True)
        self._reader.start()

    def _request(self, *msg: Any) -> Future[Any]:
        fut: Future[Any] = Future()
        with self._lock:
            if self._dead is not None:
                fut.set_exception(OtaError(ErrorCode.INTERNAL, self._dead))
                return fut
            self._seq += 1
            seq = self._seq
            self._pending[seq] = fut
        # Not under self._lock: a send blocks while the pipe is full, and the reader must
        # still be able to take answers off the other pipe meanwhile (the child may be
        # waiting to send one before it reads on). A Ctrl-C waits until the message is
        # whole: a truncated one would stall the shard's reader for good.
        with self._send_lock, sigint_deferred():
            try:
                self._conn.send((seq, *msg))
            except (OSError, ValueError) as exc:
                with self._lock:
                    mine = self._pending.pop(seq, None) is not None
                # Unless the reader, seeing the pipe close at the same moment, already failed
                # every pending request, this one included (a future is settled once).
                if mine:
                    fut.set_exception(OtaError(ErrorCode.INTERNAL, f"shard process gone: {exc}"))
        return fut

    def _read(self) -> None:
        while True:
            try:
                seq, ok, value = self._conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                fut = self._pending.pop(seq, None)
            if fut is None:
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(OtaError(ErrorCode.INTERNAL, f"simulator shard: {value}"))
        with self._lock:
            self._dead = f"simulator shard process {self._proc.name} exited"
            pending, self._pending = self._pending, {}
        for fut in pending.values():
            fut.set_exception(OtaError(ErrorCode.INTERNAL, self._dead))

    def add(self, specs: list[DeviceSpec]) -> Future[None]:
        return self._request("add", specs)

    def poll(self, idx: int, t: float) -> Future[PollOutcome]:
        return self._request("poll", idx, t)

    def close(self) -> None:
        """Let running polls finish, close the devices' flash and connections, end."""
        with contextlib.suppress(Exception):  # a dead or stuck child is terminated below
            self._request("close").result(timeout=120)
        self._proc.join(timeout=10)
        if self._proc.is_alive():
            self._proc.terminate()
            self._proc.join(timeout=10)
        self._conn.close()
        self._reader.join(timeout=10)


def shard_main(conn: Connection, cfg: ShardConfig) -> None:
    """A shard process: serve add/poll/close requests until closed (or the parent is gone)."""
    # Ctrl-C reaches the whole process group: the parent handles it and closes us
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_fd_limit(cfg.fd_cap + 1024)
    clock = SharedClock.attach(cfg.clock_name, creators_tracker=True)  # spawned by its creator
    th = _Threads(cfg, clock)
    send_lock = threading.Lock()

    def reply(seq: int, fut: Future[Any]) -> None:
        exc = _failure(fut)
        msg = (seq, True, fut.result()) if exc is None else (seq, False, f"{exc!r}")
        # a send that fails means the parent is gone: there is no one to tell
        with send_lock, contextlib.suppress(OSError, ValueError):
            conn.send(msg)

    try:
        while True:
            try:
                seq, kind, *args = conn.recv()
            except (EOFError, OSError):
                break
            if kind == "poll":
                f: Future[Any] = th.poll(args[0], args[1])
            elif kind == "add":
                f = th.add(args[0])
            else:  # close
                th.close()
                f = Future()
                f.set_result(None)
                reply(seq, f)
                break
            f.add_done_callback(partial(reply, seq))
    finally:
        th.close()
        clock.close()
        conn.close()


def device_spec(
    idx: int, files: W.DeviceFiles, opts: SimOptions, seed: int, attacked: bool
) -> tuple[DeviceSpec, float]:
    """Draw one device's link and fate from its own random stream (``seed``); the spec, and
    when in its first poll interval it first polls (seconds). The spec carries a seed for
    the device's polls, not the stream itself: a few bytes per device to its shard."""
    rng = random.Random(seed)
    link = Link.draw(opts.profile, rng)
    selftest_fail = rng.random() < opts.selftest_fail_rate
    attack = TRANSPORT_ATTACKS[idx % len(TRANSPORT_ATTACKS)] if attacked else None
    first = rng.uniform(0, link.poll_s)
    spec = DeviceSpec(idx, files, link, rng.getrandbits(64), selftest_fail, attack)
    return spec, first
