"""The fleet simulation: a discrete-event loop on a simulated clock shared by server and devices.

Only devices due at the current simulated instant do real work; each of them runs the real
:class:`~otaguard.device.updater.Updater` cycle over real mTLS HTTPS (one keep-alive client
per device identity, open connections capped by :class:`~.shard.ConnectionPool`) against the
real server, which runs in processes of its own (:mod:`.serverproc`) on the same
:class:`~.sharedclock.SharedClock`. The devices run in shards (:mod:`.shard`): child
processes with a few threads each, or this process for ``sim_procs=1``. Events of one quantum
(default 60 simulated seconds) start at the same instant; the clock may move on while they
run, by at most ``SimOptions.lookahead_quanta`` quanta (see :meth:`Simulation.run`).
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import random
import shutil
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import (
    ALL_COMPLETED,
    FIRST_COMPLETED,
    Future,
    ProcessPoolExecutor,
)
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..clock import SimClock
from ..errors import ErrorCode, OtaError, UsageError
from . import world as W
from .children import sigint_ignored
from .model import CONNECT_ATTACKS, HOUR, EventQueue, Link, SimOptions, quantize
from .shard import (
    AttackKit,
    ConnectionPool,
    DeviceSpec,
    DeviceStatus,
    LocalShard,
    PollOutcome,
    ProcessShard,
    Shard,
    ShardConfig,
    device_spec,
    raise_fd_limit,
)
from .sharedclock import SharedClock

__all__ = ["ConnectionPool", "Simulation", "raise_fd_limit", "reboot_check", "reboot_fleet"]


@dataclass
class DeviceRecord:
    """What the event loop knows of a device: who it is, its link, and its status as of its
    last finished poll (the device itself runs in a shard, :mod:`.shard`)."""

    idx: int
    files: W.DeviceFiles
    link: Link
    first_poll: float  # seconds into its poll interval at which it first polls
    status: DeviceStatus

    # the report reads these
    @property
    def patched_at(self) -> float | None:
        return self.status.patched_at

    @property
    def keylist_at(self) -> float | None:
        return self.status.keylist_at

    @property
    def reached(self) -> bool:
        return self.status.reached

    @property
    def version(self) -> str:
        return self.status.version

    @property
    def keylist_version(self) -> int:
        return self.status.keylist_version

    @property
    def attack(self) -> str | None:
        return self.status.attack


@dataclass
class Stats:
    polls: int = 0
    offline_polls: int = 0
    checkins: int = 0
    installs_ok: int = 0
    reverts: int = 0
    failures: Counter[str] = field(default_factory=Counter)
    power_cuts: int = 0
    drops: int = 0
    crashes: Counter[str] = field(default_factory=Counter)
    bytes_full: int = 0
    bytes_delta: int = 0
    attacks: dict[str, Counter[str]] = field(default_factory=dict)  # kind -> outcome/code
    timeline: list[dict[str, Any]] = field(default_factory=list)
    campaigns: list[dict[str, Any]] = field(default_factory=list)
    operator: list[str] = field(default_factory=list)
    max_drift_s: float = 0.0  # clock time that passed during one poll, at most

    def attack(self, kind: str, outcome: str) -> None:
        self.attacks.setdefault(kind, Counter())[outcome] += 1


class Simulation:
    def __init__(
        self,
        opts: SimOptions,
        out: Path,
        *,
        log: Callable[[str], None] = print,
        progress: Callable[[float, float, str], None] | None = None,
    ) -> None:
        self.opts = opts
        self.out = out
        self.log = log
        self.progress = progress
        self.stats = Stats()
        self.devices: list[DeviceRecord] = []
        self.shards: list[Shard] = []
        self.stop_reason = "not started"
        self.wall: dict[str, float] = {}
        self.t0 = float(int(time.time()))
        # shared with the server process; the hour before the release is warm-up
        self.clock = SharedClock.create(self.t0 - HOUR)
        self.keys_backend = ""
        self._campaign_seq = 0
        self._campaign: str | None = None
        self._phase_since = 0.0
        self._phase = 0
        self._paused_at: float | None = None
        self.rid = 0
        self.world: W.ServerWorld | None = None
        # Where finish() keeps the server's data for `--serve` (sim/serve.py); None: deleted.
        self.keep_server: Path | None = None

    # --- setup ---------------------------------------------------------------------------------
    def setup(self) -> None:
        o = self.opts
        w0 = time.monotonic()
        # a device's flash file is open only while it runs (Flash.park), so the open-files
        # budget goes to keep-alive connections: at most `cap` (the server process inherits
        # the limit and holds the other end of each connection)
        limit = raise_fd_limit(o.devices + 1024)
        cap = min(o.devices, limit - 1024)
        if cap < 16:
            raise UsageError(
                ErrorCode.USAGE,
                f"{o.devices} devices need more open files than the limit ({limit}): "
                "raise 'ulimit -n' or use fewer devices",
            )
        self.work = W.scratch_dir(self.out)
        self.flash_root = W.flash_dir(self.work, o.devices)
        keys = W.make_keys(self.work, o.rotation, o.hsm)
        self.keys_backend = keys.backend
        if "software" in keys.backend:
            self.log("warning: SoftHSM2 not available; using in-memory software keys (dev only)")
        self.rel = W.make_releases(keys, o.image_size, o.seed, int(self.t0))
        self.wall["keys_releases"] = time.monotonic() - w0
        w1 = time.monotonic()
        self.world = W.start_server(self.work, self.clock, self.rel, o.server_procs)
        self.rid = W.publish(self.world, self.rel)
        kit = AttackKit(self.rel.factory_manifest, self.rel.other_manifest, self.rel.other_image)
        self._start_shards(kit, cap)
        self.log(
            f"enrolling {o.devices} devices ({len(self.shards)} simulator and "
            f"{o.server_procs} server processes)"
        )
        rng = random.Random(o.seed)
        n_attacked = round(o.attack_rate * o.devices)
        attacked = set(rng.sample(range(o.devices), n_attacked)) if n_attacked else set()
        # The fleet was in service before the release: one check-in each, so the server
        # knows what every device runs when the campaign selects its target. Each enrolled
        # batch powers on and checks in in its shards while the next batch is manufactured.
        started: list[Future[None]] = []

        def ready(files: list[W.DeviceFiles]) -> None:
            batches: list[list[DeviceSpec]] = [[] for _ in self.shards]
            for f in files:
                i = len(self.devices)
                spec, first = device_spec(i, f, o, rng.getrandbits(64), i in attacked)
                self.devices.append(
                    DeviceRecord(i, f, spec.link, first, DeviceStatus(attack=spec.attack))
                )
                batches[i % len(self.shards)].append(spec)
            for shard, batch in zip(self.shards, batches, strict=True):
                if batch:
                    started.append(shard.add(batch))

        self.fleet = W.enroll_fleet(
            self.world,
            self.rel,
            self.flash_root,
            o.devices,
            self.clock,
            progress=lambda i: self.progress(i, o.devices, "enrolling") if self.progress else None,
            ready=ready,
        )
        for fut in started:
            fut.result()
        self.clock.set(self.t0)
        self.wall["enroll_devices"] = time.monotonic() - w1
        self.log(
            f"fleet: {o.devices} devices enrolled ({self.keys_backend} keys), server at "
            f"{self.world.url}, {len(self.rel.v_new)} B image, {len(self.rel.patch)} B delta"
        )

    def _start_shards(self, kit: AttackKit, cap: int) -> None:
        """The device side: ``sim_procs`` child processes (or this process for one), each
        with an equal share of the device threads and of the open-connection budget."""
        assert self.world is not None
        o = self.opts
        n = min(o.sim_procs, o.devices)
        cfg = ShardConfig(
            url=self.world.url,
            ca_pem=self.world.ca_pem,
            clock_name=self.clock.name,
            opts=o,
            kit=kit,
            patch_len=len(self.rel.patch),
            keylist_target=self.rel.keylist_target,
            t0=self.t0,
            workers=max(1, -(-o.workers // n)),
            fd_cap=max(16, cap // n),
            spki_pins=(self.world.spki_pin,) if o.pin_spki and self.world.spki_pin else (),
        )
        if n <= 1:
            self.shards = [LocalShard(cfg, self.clock)]
        else:
            self.shards = [ProcessShard(cfg, f"sim-shard-{k}") for k in range(n)]

    def close_shards(self) -> None:
        """Stop the shards (their running polls finish; their devices' flash is closed)."""
        shards, self.shards = self.shards, []
        for sh in shards:
            sh.close()

    # --- campaigns (operator) ------------------------------------------------------------------
    def _start_campaign(self, retry: bool) -> None:
        assert self.world is not None
        o = self.opts
        self._campaign_seq += 1
        name = f"patch-{W.V_NEW}" + (f"-retry{self._campaign_seq - 1}" if retry else "")
        phases = (
            [{"fraction": 1.0}]
            if retry
            else [{"fraction": p.fraction, "min_soak_s": p.min_soak_s} for p in o.phases]
        )
        body = {
            "id": name,
            "release_id": self.rid,
            "selector": {"model": W.MODEL, "hw_rev": W.HW_REV},
            "phases": phases,
            "success_threshold": o.success_threshold,
            "failure": {"max_failed_fraction": 0.5, "min_finished": 20},
            "deadline": self.t0 + o.sla_s,
        }
        W.create_campaign(self.world, body)
        W.campaign_action(self.world, name, "start")
        self._campaign = name
        self._phase = 1
        self._phase_since = self.clock.now()
        self.stats.operator.append(f"{self._h():.1f} h: started campaign {name}")

    def _h(self) -> float:
        return (self.clock.now() - self.t0) / HOUR

    def _operate(self) -> None:
        """The operator's policy: resume auto-pauses after a look, re-target stragglers."""
        assert self.world is not None and self._campaign is not None
        now = self.clock.now()
        cur = next(
            (
                c
                for c in W.list_campaigns(self.world)
                if self._campaign in (c.get("id"), c.get("name"))
            ),
            None,
        )
        if cur is None:
            return
        if cur["phase"] != self._phase:
            self._phase = int(cur["phase"])
            self._phase_since = now
            self.stats.operator.append(f"{self._h():.1f} h: {self._campaign} phase {self._phase}")
        status = cur["status"]
        if status == "paused":
            if self._paused_at is None:
                self._paused_at = now
                self.stats.operator.append(
                    f"{self._h():.1f} h: {self._campaign} paused: {cur.get('pause_reason')}"
                )
            elif now - self._paused_at >= HOUR:
                W.campaign_action(
                    self.world, self._campaign, "resume", "operator reviewed the failures"
                )
                self._paused_at = None
                self.stats.operator.append(f"{self._h():.1f} h: resumed {self._campaign}")
            return
        stragglers = any(
            d.reached and d.patched_at is None and not d.link.dead for d in self.devices
        )
        # a phase that has not moved for retry_after_s (reverted canaries, offline members),
        # or a finished campaign with devices still behind: re-target everything behind
        finished = status == "completed" or now - self._phase_since >= self.opts.retry_after_s
        if finished and stragglers:
            if status in ("running", "paused"):
                W.campaign_action(
                    self.world, self._campaign, "abort", "superseded by a retry campaign"
                )
            self.stats.campaigns.append(cur)
            self._start_campaign(retry=True)

    # --- accounting ---------------------------------------------------------------------------
    def _account(self, sd: DeviceRecord, ev: dict[str, Any]) -> None:
        s = self.stats
        s.polls += 1
        if ev.get("offline"):
            s.offline_polls += 1
            return
        s.checkins += 1
        s.max_drift_s = max(s.max_drift_s, ev.get("drift", 0.0))
        b = ev.get("bytes", {})
        s.bytes_full += b.get("full", 0)
        s.bytes_delta += b.get("delta", 0)
        if ev.get("power_cut"):
            s.power_cuts += 1
        if "crash" in ev:
            s.crashes[ev["crash"]] += 1
        out = ev.get("outcome")
        if out == "confirmed":
            s.installs_ok += 1
        elif out == "reverted":
            s.reverts += 1
        # Counted where the link drops, not from the poll's outcome: a dropped patch download
        # is resumed within the same poll (device/agent.py) and a dropped image download ends
        # the poll as a crash (resumed at the next), so neither shows as an E_TRANSPORT error.
        s.drops += ev.get("drops", 0)
        if ev.get("error"):
            s.failures[ev["error"]] += 1
        if "attack" in ev:
            kind, outcome = ev["attack"]
            s.attack(kind, outcome)

    # --- connection-level attacks --------------------------------------------------------------
    def _connect_attack(self, kind: str) -> str:
        """Dial the device API as an attacker; returns the refusal code (or ACCEPTED)."""
        assert self.world is not None
        ctx = ssl.create_default_context(cafile=str(self.world.ca_pem))
        if kind == "foreign-cert":
            cert, key = _foreign_identity(self.work, "HVAC-000000")
            ctx.load_cert_chain(str(cert), str(key))
        elif kind == "revoked-cert":
            f = self.fleet.extra["revoked"]
            ctx.load_cert_chain(str(f.cert), str(f.key))
        try:
            with httpx.Client(base_url=self.world.url, verify=ctx, timeout=10) as c:
                r = c.post("/v1/checkin", json={"version": W.V_OLD})
        except (httpx.TransportError, ssl.SSLError):
            return ErrorCode.CERT.value  # refused in the TLS handshake
        if r.status_code < 300:
            return "ACCEPTED"
        try:
            return str(r.json()["error"])
        except (ValueError, KeyError, TypeError):
            return f"HTTP {r.status_code}"

    # --- the loop ------------------------------------------------------------------------------
    def run(self) -> None:
        """The event loop. Polls due in one quantum start at that quantum's instant on the
        thread pool; the loop does not wait for them before moving the clock on, but never
        more than ``lookahead_quanta`` quanta past the start of the oldest poll still
        running (a long install sees the clock move a few simulated minutes, as it would in
        reality, instead of every quantum waiting for its slowest poll). Before an hourly
        sample and at the end every running poll is waited for; the operator's look every
        10 simulated minutes sees the polls finished so far, like a dashboard."""
        o = self.opts
        q = EventQueue()
        t0 = self.t0
        for sd in self.devices:
            q.push(t0 + sd.first_poll, sd.idx)
        rng = random.Random(o.seed + 1)
        connect: list[tuple[float, str]] = []
        for kind in CONNECT_ATTACKS:
            for _ in range(o.connect_attacks):
                connect.append((t0 + rng.uniform(0, 24 * HOUR), kind))
        for k, (t, _kind) in enumerate(connect):
            q.push(t, -1 - k)
        self._start_campaign(retry=False)
        end = t0 + o.duration_s
        alive = [d for d in self.devices if not d.link.dead]
        # what the stop test needs, kept up to date instead of rescanned every quantum
        behind = {d.idx for d in alive if not self._done(d)}
        connect_left = len(connect)
        next_sample = t0
        next_op = t0
        w0 = time.monotonic()
        self.stop_reason = f"simulated window of {o.duration_s / HOUR:.0f} h ended"
        running: dict[Future[PollOutcome], tuple[DeviceRecord, float]] = {}
        # finished polls arrive here (a done-callback each): harvesting costs O(finished),
        # not a scan of (or a waiter on) every running future
        finished: queue.SimpleQueue[Future[PollOutcome]] = queue.SimpleQueue()
        # start times of running polls, oldest first (they are submitted in time order)
        starts: deque[float] = deque()
        live: Counter[float] = Counter()
        slack = o.lookahead_quanta * o.quantum_s
        shown = 0.0

        def harvest(block: str | None) -> None:
            """Account finished polls; ``block``: first wait for one (FIRST_COMPLETED) or for
            all of them (ALL_COMPLETED)."""
            n = 0
            while running:
                blocking = block == ALL_COMPLETED or (block is not None and n == 0)
                try:  # a timeout keeps Ctrl-C responsive while waiting
                    fut = finished.get(timeout=1.0) if blocking else finished.get_nowait()
                except queue.Empty:
                    if blocking:
                        continue
                    return
                n += 1
                sd, started = running.pop(fut)
                live[started] -= 1
                while starts and live[starts[0]] <= 0:
                    del live[starts.popleft()]
                nxt, ev, sd.status = fut.result()
                self._account(sd, ev)
                if sd.idx in behind and self._done(sd):
                    behind.discard(sd.idx)
                if o.retire_converged and self._converged(sd):
                    continue  # only "no update" polls would follow
                q.push(max(nxt, started + o.quantum_s, self.clock.now()), sd.idx)

        shards = self.shards
        while True:
            harvest(None)
            nt = q.peek()
            if nt is None or nt > end:
                if running:  # finished polls may schedule more within the window
                    harvest(ALL_COMPLETED)
                    continue
                break
            now = quantize(max(nt, self.clock.now()), t0, o.quantum_s)
            if running and (next_sample <= now or now - starts[0] > slack):
                harvest(ALL_COMPLETED if next_sample <= now else FIRST_COMPLETED)
                continue  # the queue may hold earlier events now
            self.clock.set(now)
            while next_sample <= now:
                self._sample(next_sample)
                next_sample += HOUR
            if now >= next_op:
                self._operate()
                next_op = now + 600
            for _, k in q.pop_due(now):
                if k < 0:
                    connect_left -= 1
                    kind = connect[-1 - k][1]
                    self.stats.attack(kind, self._connect_attack(kind))
                else:
                    sd = self.devices[k]
                    fut = shards[k % len(shards)].poll(k, now)
                    running[fut] = (sd, now)
                    if not starts or starts[-1] != now:
                        starts.append(now)
                    live[now] += 1
                    fut.add_done_callback(finished.put)
            if slack <= 0:
                harvest(ALL_COMPLETED)  # one quantum at a time
            if self.progress is not None and time.monotonic() - shown >= 0.25:
                shown = time.monotonic()  # the text counts the whole fleet: not every quantum
                self.progress(now - t0, o.duration_s, self._progress_text(alive))
            if o.stop_when_converged and not connect_left and not behind:
                harvest(ALL_COMPLETED)
                self.stop_reason = "every reachable device converged"
                break
        harvest(ALL_COMPLETED)
        self._sample(self.clock.now())
        self.end_t = self.clock.now()
        self.wall["run"] = time.monotonic() - w0

    def _done(self, sd: DeviceRecord) -> bool:
        """Patched and on the target key list (what the stop test waits for)."""
        return sd.patched_at is not None and sd.keylist_version >= self.rel.keylist_target

    def _converged(self, sd: DeviceRecord) -> bool:
        return (
            sd.patched_at is not None
            and sd.keylist_version >= self.rel.keylist_target
            and sd.attack is None
        )

    def _progress_text(self, alive: list[DeviceRecord]) -> str:
        patched = sum(1 for d in alive if d.patched_at is not None)
        return f"{patched}/{len(alive)} patched, {self.stats.checkins} check-ins"

    def _sample(self, t: float) -> None:
        n = len(self.devices)
        patched = sum(1 for d in self.devices if d.patched_at is not None and d.patched_at <= t)
        kl = sum(1 for d in self.devices if d.keylist_at is not None and d.keylist_at <= t)
        self.stats.timeline.append(
            {
                "h": (t - self.t0) / HOUR,
                "patched": patched / n,
                "keylist": kl / n,
                "phase": self._phase,
                "campaign": self._campaign_seq,
                "bytes_full": self.stats.bytes_full,
                "bytes_delta": self.stats.bytes_delta,
                "reverts": self.stats.reverts,
                "failures": sum(self.stats.failures.values()),
            }
        )

    # --- the end -------------------------------------------------------------------------------
    def discard_flash(self) -> None:
        """Remove the devices' flash files (they may be on tmpfs, i.e. RAM) after a failed
        setup; :meth:`finish` does this itself."""
        self.close_shards()
        root = getattr(self, "flash_root", None)
        if root is not None:
            W.remove_flash_dir(root)

    def finish(self) -> dict[str, Any]:
        """Tear the server down, then reboot every device from its flash (is anything
        bricked?): each device's bootloader runs on its flash file, in up to two processes."""
        w0 = time.monotonic()
        self.close_shards()
        if self.world is not None:
            self.world.close()
            self.world = None
        now = self.clock.now()
        self.clock.close()
        if self.keep_server is not None:
            from .serve import keep_server_files

            keep_server_files(self.work, self.keep_server, self.rel.bundle.to_bytes(), now)
        results = reboot_fleet([sd.files for sd in self.devices], now)
        bricked: list[str] = []
        versions: Counter[str] = Counter()
        for sd, (version, error) in zip(self.devices, results, strict=True):
            if error is not None:
                bricked.append(f"{sd.files.serial}: {error}")
                continue
            versions[version or "?"] += 1
            sd.status.version = version or sd.status.version
        self.wall["reboot_check"] = time.monotonic() - w0
        # device flash files, keys and the server database are scratch: the report stays
        W.remove_flash_dir(self.flash_root)
        shutil.rmtree(self.work, ignore_errors=True)
        return {"bricked": bricked, "versions": dict(versions)}


def reboot_check(files: list[W.DeviceFiles], now: float) -> list[tuple[str | None, str | None]]:
    """Power each device up from its flash (a new Device: the bootloader decides, verifies
    and boots); (running version, None) or (None, the error code that left it unbootable).
    An unconfirmed image left in test mode is not a brick: it reverts at the next boot."""
    clock = SimClock(now)
    out: list[tuple[str | None, str | None]] = []
    for f in files:
        try:
            with W.open_device(f, clock) as dev:
                boot = dev.boot()
                if boot.mode == "test":
                    boot = dev.boot()
                out.append((boot.version, None))
        except OtaError as err:
            out.append((None, err.code.value))
    return out


def reboot_fleet(
    files: list[W.DeviceFiles], now: float, *, procs: int | None = None, chunk: int = 500
) -> list[tuple[str | None, str | None]]:
    """:func:`reboot_check` for the whole fleet, split over worker processes (the server is
    stopped by then, so every core is free); in-process for a small fleet."""
    procs = procs if procs is not None else min(2, os.cpu_count() or 1)
    if procs < 2 or len(files) < 2 * chunk:
        return reboot_check(files, now)
    parts = [files[i : i + chunk] for i in range(0, len(files), chunk)]
    try:
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=procs, mp_context=ctx) as ex:
            with sigint_ignored():  # the workers start on the first submissions
                futs = [ex.submit(reboot_check, part, now) for part in parts]
            done = [f.result() for f in futs]
    except (OSError, BrokenProcessPool):
        return reboot_check(files, now)
    return [r for part in done for r in part]


def _foreign_identity(work: Path, serial: str) -> tuple[Path, Path]:
    """A self-made CA's client certificate claiming a real device's serial."""
    d = work / "attacker"
    cert_p, key_p = d / "client.pem", d / "client.key"
    if cert_p.exists():
        return cert_p, key_p
    d.mkdir(exist_ok=True)
    import datetime as dt

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, serial),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, serial),
        ]
    )
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    cert_p.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_p.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_p, key_p
