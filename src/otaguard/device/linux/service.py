"""``otaguard agent run``: the long-running device service.

One :class:`~...updater.Updater` cycle per poll (jittered, so a fleet that rebooted together
does not poll together), systemd's watchdog fed between and during cycles (``WatchdogSec=`` in
``files/otaguard-agent.service``: a hung agent is restarted), and a real reboot whenever the
device asks for one.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from ...errors import ErrorCode, OtaError
from ..bootloader import BootResult
from ..hal import Slot
from ..https_transport import HttpsTransport
from ..renewal import CertRenewal
from ..selftest import SelfTest, command_self_test
from ..updater import PollResult, Updater, write_identity_files
from .config import AgentConfig
from .system import LinuxDevice, RebootRequested, drain_outbox

REBOOT_GRACE = 120.0  # seconds to wait for the system to take us down after asking


def log(msg: str) -> None:
    print(f"otaguard-agent: {msg}", file=sys.stderr, flush=True)


def sd_notify(state: str) -> bool:
    """The sd_notify protocol, without libsystemd: one datagram to $NOTIFY_SOCKET."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
    except OSError:
        return False
    return True


def self_test_of(cfg: AgentConfig) -> SelfTest:
    """Every configured command must exit 0 (none configured: the boot itself is the test)."""
    tests = [command_self_test(list(c), timeout=cfg.self_test_timeout) for c in cfg.self_test]

    def check(boot: BootResult) -> bool:
        for argv, test in zip(cfg.self_test, tests, strict=True):
            if not test(boot):
                log(f"self-test failed: {' '.join(argv)}")
                return False
        return True

    return check


def reboot(cfg: AgentConfig, reason: str) -> None:
    log(f"rebooting: {reason}")
    os.sync()
    subprocess.run(list(cfg.reboot), check=False)
    time.sleep(REBOOT_GRACE)  # the system stops us; if it does not, systemd restarts us
    raise OtaError(ErrorCode.REBOOT, "the system did not reboot")


def progress_logger(every: int = 4 * 1024 * 1024) -> Callable[[Slot, int, int], None]:
    last = [-every]

    def progress(slot: Slot, done: int, total: int) -> None:
        sd_notify("WATCHDOG=1")
        if done - last[0] >= every or done == total:
            last[0] = done
            log(f"progress slot={slot.name} bytes={done}/{total}")

    return progress


def transport_for(cfg: AgentConfig, dev: LinuxDevice) -> HttpsTransport:
    cert, key = write_identity_files(dev, cfg.run_dir)
    return HttpsTransport(
        cfg.server_url,
        ca_file=cfg.server_ca,
        cert_file=cert,
        key_file=key,
        spki_pins=set(cfg.spki_pins),
        status=dev.checkin_facts,
        timeout=cfg.timeout,
        keepalive_expiry=None,
        key_loader=dev.key_loader(),
    )


def run(cfg: AgentConfig, *, once: bool = False, rng: random.Random | None = None) -> None:
    rng = rng or random.Random()
    dev = LinuxDevice(cfg, progress=progress_logger())
    transport = transport_for(cfg, dev)
    renewal = None
    if cfg.renew_fraction > 0:
        renewal = CertRenewal(
            dev.storage,
            transport,
            fraction=cfg.renew_fraction,
            new_key=dev.renewal_key_maker(),  # a TPM device renews with a new TPM key
        )
    updater = Updater(
        dev,
        transport,
        self_test=self_test_of(cfg),
        poll_interval=cfg.poll_interval,
        renewal=renewal,
    )
    sd_notify("READY=1")
    log(f"running slot={'AB'[dev.running]} server={cfg.server_url}")
    while True:
        sd_notify("WATCHDOG=1")
        try:
            n = drain_outbox(cfg.state_dir, transport.report)
            if n:
                log(f"sent {n} queued report(s)")
        except OtaError as err:
            log(f"queued reports not sent yet: {err.code.value}")
        try:
            result = updater.poll_once()
        except RebootRequested as req:
            sd_notify("STOPPING=1")
            reboot(cfg, req.detail)
            return
        _log_result(result)
        if once:
            return
        wait = updater.poll_interval * (1.0 + cfg.poll_jitter * (2 * rng.random() - 1))
        _sleep_fed(max(1.0, wait))


def _log_result(r: PollResult) -> None:
    parts: dict[str, Any] = {"outcome": r.outcome, "version": r.version}
    for k in ("offered", "error", "keylist_error", "cert"):
        if getattr(r, k):
            parts[k] = getattr(r, k)
    log("poll " + " ".join(f"{k}={v}" for k, v in parts.items()))


def _sleep_fed(seconds: float, step: float = 10.0) -> None:
    end = time.monotonic() + seconds
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(step, left))
        sd_notify("WATCHDOG=1")
