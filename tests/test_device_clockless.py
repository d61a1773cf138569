"""Manifest expiry on a device without a clock (threat 2.5, gap G2).

A clockless device (``clock=lambda: None``) has only one notion of time: the newest
``issued_at`` of a key list it verified (``TrustStore.effective_time``). These tests show that
this time is enough to refuse a manifest whose use-before lies before it (``E_EXPIRED``, before
any image byte is fetched, and again after a reboot), and that the same manifest installs when
no newer key list has been seen (the control).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from otaguard.clock import SimClock
from otaguard.device.device import Device
from otaguard.device.lab import DAY, Lab, MemoryTransport, image_bytes
from otaguard.device.layout import LayoutConfig
from otaguard.device.updater import Updater
from otaguard.errors import ErrorCode, OtaError
from otaguard.trust.documents import sign_keylist
from tests.test_rotation_device import FakeServer

CFG = LayoutConfig(slot_size=64 * 1024, manifest_size=4096)
V1 = image_bytes(20_000, 1)
V2 = image_bytes(24_000, 2)


def no_clock() -> int | None:
    return None


@pytest.fixture
def lab() -> Lab:
    return Lab()


@pytest.fixture
def dev_dir(lab: Lab, tmp_path: Path) -> Path:
    d = tmp_path / "dev"
    lab.provision(d, V1, cfg=CFG, checkpoint=8192, clock=no_clock).close()
    return d


def clockless(d: Path) -> Device:
    return Device(d, clock=no_clock, checkpoint=8192)


def expiring_release(lab: Lab) -> tuple[bytes, int]:
    """A release (v1.1.0) that may be used until 10 days after the lab's 'now'."""
    expires = lab.now + 10 * DAY
    return lab.release(V2, version="1.1.0", seq=6, counter=2, expires=expires), expires


def keylist_issued_at(lab: Lab, issued_at: int, version: int = 2) -> bytes:
    """A genuine root-signed key list (same keys) whose only news is its ``issued_at``."""
    return sign_keylist(lab.root, version=version, authorizations=lab.auths, issued_at=issued_at)


def code_of(fn: Any, *args: Any) -> ErrorCode:
    with pytest.raises(OtaError) as exc:
        fn(*args)
    return exc.value.code


def test_keylist_time_expires_the_manifest_on_a_clockless_device(lab: Lab, dev_dir: Path) -> None:
    manifest, expires = expiring_release(lab)
    with clockless(dev_dir) as dev:
        dev.boot()
        assert dev.agent.clock() is None
        assert dev.apply_keylist_update(keylist_issued_at(lab, expires + 1)) == 2
        assert dev.storage.load_trust().latest_time == expires + 1
        t = MemoryTransport(manifest, V2)
        assert code_of(dev.install, t) == ErrorCode.EXPIRED
        assert t.offsets == []  # refused before a single image byte was requested
        assert dev.storage.staging() is None
        assert dev.bootloader.bootstate.load().pending is None
    # The learned time is persisted in the trust record: still expired after a reboot.
    with clockless(dev_dir) as dev:
        r = dev.boot()
        assert (r.mode, r.version) == ("normal", "1.0.0")
        t = MemoryTransport(manifest, V2)
        assert code_of(dev.install, t) == ErrorCode.EXPIRED
        assert t.offsets == []
    # A clock reset to 1970 cannot bring the manifest back either.
    with Device(dev_dir, clock=lambda: 0, checkpoint=8192) as dev:
        dev.boot()
        assert code_of(dev.install, MemoryTransport(manifest, V2)) == ErrorCode.EXPIRED


def test_control_same_manifest_installs_without_a_newer_keylist(lab: Lab, dev_dir: Path) -> None:
    manifest, expires = expiring_release(lab)
    with clockless(dev_dir) as dev:
        dev.boot()
        # Only the factory key list (issued a day before 'now') is known: not expired.
        latest = dev.storage.load_trust().latest_time
        assert latest is not None and latest < expires
        t = MemoryTransport(manifest, V2)
        dev.install(t)
        assert t.offsets == [0]
        assert dev.boot().mode == "test"
        dev.confirm()
    with clockless(dev_dir) as dev:
        r = dev.boot()
        assert (r.mode, r.version) == ("normal", "1.1.0")


@pytest.mark.parametrize(
    ("issued_offset", "expired"),
    [(-DAY, False), (0, False), (1, True), (200 * DAY, True)],
    ids=["day-before", "at-use-before", "one-second-after", "long-after"],
)
def test_keylist_time_boundary(lab: Lab, dev_dir: Path, issued_offset: int, expired: bool) -> None:
    """The use-before is inclusive: a list issued exactly at it leaves the manifest valid.
    (200 days after stays inside the lab key's validity, which ends 300 days after 'now'.)"""
    manifest, expires = expiring_release(lab)
    with clockless(dev_dir) as dev:
        dev.boot()
        dev.apply_keylist_update(keylist_issued_at(lab, expires + issued_offset))
        t = MemoryTransport(manifest, V2)
        if expired:
            assert code_of(dev.install, t) == ErrorCode.EXPIRED
            assert t.offsets == []
        else:
            dev.install(t)
            assert dev.boot().mode == "test"


@pytest.mark.parametrize("newer_list", [True, False], ids=["list-after-expiry", "old-list"])
def test_updater_on_a_clockless_device(lab: Lab, dev_dir: Path, newer_list: bool) -> None:
    """Same check through the polling client: the key list lands first, then the offer."""
    manifest, expires = expiring_release(lab)
    issued = expires + 1 if newer_list else lab.now - DAY // 2
    srv = FakeServer(manifest, V2, keylist_issued_at(lab, issued))
    srv.keylist_version = 2
    with clockless(dev_dir) as dev:
        r = Updater(dev, srv, clock=SimClock(0)).poll_once()
        assert (r.keylist_from, r.keylist_version) == (1, 2)
        if newer_list:
            assert (r.outcome, r.error, r.version) == ("failed", "E_EXPIRED", "1.0.0")
            assert srv.offsets == []
            assert {"event": "error", "error": "E_EXPIRED"}.items() <= srv.events[-1].items()
        else:
            assert (r.outcome, r.error, r.version) == ("confirmed", None, "1.1.0")
