"""The Linux backend on the host: regular files stand in for the slot partitions and the ESP.

The same state machine as the simulator runs here; what these tests pin down is the Linux
side of it: GRUB's env mirrors the authenticated boot state, the running slot is never
written, each refusal has its code and writes nothing to the inactive slot. The real kernel,
GRUB and power cuts are in tests/vm/.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otaguard.device.device import Provisioning
from otaguard.device.lab import Lab, MemoryTransport, chunks
from otaguard.device.linux.config import AgentConfig
from otaguard.device.linux.grub import booted_slot
from otaguard.device.linux.grubenv import (
    BLOCK_SIZE,
    SECTOR,
    BootEnv,
    GrubEnvStore,
    decode_block,
    encode_block,
    initial_env,
)
from otaguard.device.linux.system import LinuxDevice, RebootRequested
from otaguard.errors import ErrorCode, OtaError

SLOT = 256 * 1024
PIN = "ab" * 32


def image(version: str, n: int = 100_000) -> bytes:
    seed = hashlib.sha256(version.encode()).digest()
    return (seed * (n // len(seed) + 1))[:n]


def write_config(d: Path, **extra: str) -> Path:
    lines = {
        "server": f'url = "https://127.0.0.1:8443"\nspki_pins = ["{PIN}"]',
        "device": (
            f'state_dir = "{d / "state"}"\nrun_dir = "{d / "run"}"\n'
            f'slot_a = "{d / "slot-a.img"}"\nslot_b = "{d / "slot-b.img"}"\n'
            "max_tries = 3\ncheckpoint = 65536"
        ),
        "bootloader": f'grubenv = ["{d / "esp" / "grubenv.0"}", "{d / "esp" / "grubenv.1"}"]\n'
        f'cmdline = "{d / "cmdline"}"',
    }
    lines.update(extra)
    text = "".join(f"[{k}]\n{v}\n" for k, v in lines.items())
    p = d / "agent.toml"
    p.write_text(text)
    return p


class Rig:
    """One Linux device on files; ``boot(slot)`` is a reboot in which GRUB started ``slot``."""

    def __init__(self, d: Path, lab: Lab) -> None:
        self.d = d
        self.lab = lab
        for n in ("state", "esp"):
            (d / n).mkdir()
        for s in ("a", "b"):
            (d / f"slot-{s}.img").write_bytes(bytes(SLOT))
        self.cfg = AgentConfig.load(write_config(d))
        self.boots = 0

    def provision(self, factory: bytes) -> None:
        manifest = self.lab.release(factory, version="1.0.0", seq=1, counter=1)
        prov = Provisioning(
            self.lab.bundle,
            self.lab.vendor_id,
            self.lab.class_id,
            self.lab.model,
            self.lab.hw_rev,
            manifest,
        )
        dev = LinuxDevice(self.cfg, running=0, provisioning=True)
        dev.provision(prov, chunks(factory))

    def device(self, running: int) -> LinuxDevice:
        (self.d / "cmdline").write_text(f"console=ttyS0 otaguard.slot={'AB'[running]} ro\n")
        return LinuxDevice(self.cfg, clock=lambda: self.lab.now)

    def boot(self, running: int) -> LinuxDevice:
        """A power cycle: RAM (the run dir) is gone, GRUB started ``running``."""
        self.boots += 1
        run = self.d / "run"
        for f in run.glob("*") if run.exists() else ():
            f.unlink()
        return self.device(running)

    def env(self) -> BootEnv:
        return GrubEnvStore(self.cfg.grubenv).read(repair=False)


@pytest.fixture
def rig(tmp_path: Path) -> Rig:
    r = Rig(tmp_path, Lab(now=int(time.time())))  # the CLI runs on the real clock
    r.provision(image("1.0.0"))
    return r


def test_update_confirm_mirrors_boot_state_into_grub_env(rig: Rig) -> None:
    dev = rig.boot(0)
    assert dev.assess().mode == "normal"
    assert rig.env().order == ("A", "B") and rig.env().states[0] == "good"
    new = image("1.1.0")
    env = rig.lab.release(new, version="1.1.0", seq=2, counter=2)
    dev.install(MemoryTransport(env, new))
    e = rig.env()
    assert e.order == ("B", "A") and e.states == ("good", "pending") and e.tries[1] == 3
    assert (rig.d / "slot-b.img").read_bytes()[: len(new)] == new
    with pytest.raises(RebootRequested):
        dev.boot()  # the installed image runs only after a real reboot
    dev = rig.boot(1)
    res = dev.assess()
    assert (res.slot_name, res.mode, res.version) == ("B", "test", "1.1.0")
    assert dev.run_self_test(lambda _b: True) == "confirmed"
    e = rig.env()
    assert e.order == ("B", "A") and e.states == ("good", "good")
    st = rig.boot(1)
    assert st.assess().mode == "normal"
    status = st.status()
    assert status["counters"]["security"] == 2
    assert status["boot"] == {"slot": "B", "mode": "normal"}


def test_self_test_failure_reverts_and_reboots_to_old_slot(rig: Rig) -> None:
    dev = rig.boot(0)
    dev.assess()
    new = image("1.1.0")
    dev.install(MemoryTransport(rig.lab.release(new, version="1.1.0", seq=2, counter=2), new))
    dev = rig.boot(1)
    dev.assess()
    assert dev.run_self_test(lambda _b: False) == "reverted"
    e = rig.env()
    assert e.order == ("A", "B") and e.states == ("good", "bad")
    with pytest.raises(RebootRequested):
        dev.boot()  # running B, which must not run: back to A
    res = rig.boot(0).assess()
    assert (res.slot_name, res.mode) == ("A", "normal")
    assert rig.boot(0).status()["counters"]["security"] == 1  # never raised


def test_grub_giving_up_on_pending_slot_is_a_watchdog_revert(rig: Rig) -> None:
    dev = rig.boot(0)
    dev.assess()
    new = image("1.1.0")
    dev.install(MemoryTransport(rig.lab.release(new, version="1.1.0", seq=2, counter=2), new))
    res = rig.boot(0).assess()  # GRUB ran out of tries on B and started A
    assert (res.slot_name, res.mode, res.reverted) == ("A", "normal", ErrorCode.WATCHDOG.value)
    assert rig.env().states == ("good", "bad")
    queued = (rig.cfg.state_dir / "outbox.jsonl").read_text().splitlines()
    assert [json.loads(q) for q in queued] == [
        {"event": "reverted", "error": "E_WATCHDOG", "version": "1.0.0"}
    ]  # the server is told, so it stops offering the release
    rig.boot(0).assess()
    assert len((rig.cfg.state_dir / "outbox.jsonl").read_text().splitlines()) == 1  # once


def test_altered_pending_slot_is_refused_at_first_boot(rig: Rig) -> None:
    dev = rig.boot(0)
    dev.assess()
    new = image("1.1.0")
    dev.install(MemoryTransport(rig.lab.release(new, version="1.1.0", seq=2, counter=2), new))
    with (rig.d / "slot-b.img").open("r+b") as f:
        f.seek(5000)
        f.write(b"\x00evil")
    dev = rig.boot(1)
    with pytest.raises(RebootRequested):
        dev.assess()
    assert rig.env().order == ("A", "B") and rig.env().states[1] == "bad"
    res = rig.boot(0).assess()
    assert (res.slot_name, res.reverted) == ("A", None)
    assert rig.boot(0).status()["last_boot_error"] == ErrorCode.IMAGE_DIGEST.value


def test_rollback_refused_and_inactive_slot_untouched(rig: Rig) -> None:
    dev = rig.boot(0)
    dev.assess()
    new = image("1.1.0")
    dev.install(MemoryTransport(rig.lab.release(new, version="1.1.0", seq=2, counter=5), new))
    dev = rig.boot(1)
    dev.assess()
    dev.run_self_test(lambda _b: True)
    before = (rig.d / "slot-a.img").read_bytes()
    old = image("1.0.5")
    dev = rig.boot(1)
    dev.assess()
    with pytest.raises(OtaError) as ei:
        dev.install(MemoryTransport(rig.lab.release(old, version="1.0.5", seq=3, counter=4), old))
    assert ei.value.code == ErrorCode.SECURITY_COUNTER
    assert (rig.d / "slot-a.img").read_bytes() == before


def test_running_slot_is_never_opened_for_writing(rig: Rig) -> None:
    dev = rig.boot(0)
    dev.assess()
    with pytest.raises(OtaError) as ei:
        dev.slots.writer(dev.slots.slots[0], 10, dev.bootloader.current.info.digest_alg)  # type: ignore[union-attr]
    assert ei.value.code == ErrorCode.STATE


def test_slot_too_small_refused_before_a_byte_is_written(rig: Rig) -> None:
    dev = rig.boot(0)
    dev.assess()
    big = image("9.0.0", SLOT + 1)
    with pytest.raises(OtaError) as ei:
        dev.install(MemoryTransport(rig.lab.release(big, version="9.0.0", seq=2, counter=1), big))
    assert ei.value.code == ErrorCode.SLOT_FULL
    assert (rig.d / "slot-b.img").read_bytes() == bytes(SLOT)


def test_corrupt_boot_env_refuses_install_and_boot_check_repairs_it(rig: Rig) -> None:
    dev = rig.boot(0)
    dev.assess()
    for p in rig.cfg.grubenv:
        p.write_bytes(b"\x00" * 1024)
    new = image("1.1.0")
    with pytest.raises(OtaError) as ei:
        dev.install(MemoryTransport(rig.lab.release(new, version="1.1.0", seq=2, counter=2), new))
    assert ei.value.code == ErrorCode.BOOT_ENV
    assert (rig.d / "slot-b.img").read_bytes() == bytes(SLOT)  # nothing written
    rig.boot(0).assess()  # GRUB used its default (A); the boot check rewrites the env
    assert rig.env().order == ("A", "B") and rig.env().states == ("good", "bad")
    dev = rig.boot(0)
    dev.assess()
    dev.install(MemoryTransport(rig.lab.release(new, version="1.1.0", seq=2, counter=2), new))
    assert rig.env().states == ("good", "pending")


def test_bad_setup_errors_have_codes(tmp_path: Path, rig: Rig) -> None:
    cases: list[tuple[str, ErrorCode]] = []
    # missing config
    with pytest.raises(OtaError) as ei:
        AgentConfig.load(tmp_path / "nope.toml")
    cases.append(("missing", ei.value.code))
    # no SPKI pin
    d = tmp_path / "nopin"
    d.mkdir()
    p = write_config(d, server='url = "https://127.0.0.1:8443"\nspki_pins = []')
    with pytest.raises(OtaError) as ei:
        AgentConfig.load(p)
    cases.append(("nopin", ei.value.code))
    # unknown key
    p = write_config(d, server=f'url = "https://x"\nspki_pins = ["{PIN}"]\nsurprise = 1')
    with pytest.raises(OtaError) as ei:
        AgentConfig.load(p)
    cases.append(("unknown", ei.value.code))
    assert all(code == ErrorCode.CONFIG for _, code in cases), cases
    # a slot device that does not exist
    (rig.d / "slot-b.img").unlink()
    with pytest.raises(OtaError) as ei:
        rig.boot(0)
    assert ei.value.code == ErrorCode.SLOT_DEVICE
    # a state directory that is not one
    d2 = tmp_path / "statefile"
    d2.mkdir()
    p = write_config(d2)
    (d2 / "state").write_text("not a directory")
    with pytest.raises(OtaError) as ei:
        LinuxDevice(AgentConfig.load(p), running=0)
    assert ei.value.code == ErrorCode.STORAGE


def test_cmdline_without_slot_is_boot_env_error() -> None:
    assert booted_slot("ro otaguard.slot=B quiet") == 1
    for bad in ("ro quiet", "otaguard.slot=C", "otaguard.slot=A otaguard.slot=B"):
        with pytest.raises(OtaError) as ei:
            booted_slot(bad)
        assert ei.value.code == ErrorCode.BOOT_ENV


# --- the env block ---------------------------------------------------------------------------
envs = st.builds(
    BootEnv,
    seq=st.integers(0, 10**9),
    order=st.sampled_from([("A", "B"), ("B", "A")]),
    states=st.tuples(*[st.sampled_from(["good", "pending", "bad"])] * 2),
    tries=st.tuples(st.integers(0, 9), st.integers(0, 9)),
)


@given(envs)
def test_env_block_round_trips_within_one_sector(env: BootEnv) -> None:
    block = encode_block(env.variables())
    assert len(block) == BLOCK_SIZE
    assert block[SECTOR:] == b"#" * (BLOCK_SIZE - SECTOR)  # everything in sector 0
    assert BootEnv.from_variables(decode_block(block)) == env


@given(st.binary(min_size=BLOCK_SIZE, max_size=BLOCK_SIZE))
def test_env_decoder_never_accepts_garbage_as_ours(data: bytes) -> None:
    try:
        BootEnv.from_variables(decode_block(data))
    except OtaError as err:
        assert err.code == ErrorCode.BOOT_ENV
    else:
        raise AssertionError("random bytes accepted as a boot environment")


@settings(max_examples=60, deadline=None)
@given(old=envs, new=envs, cut=st.integers(0, 2), lose=st.sampled_from([None, 0, 1]))
def test_a_cut_during_an_env_write_leaves_old_or_new(
    tmp_path_factory: pytest.TempPathFactory,
    old: BootEnv,
    new: BootEnv,
    cut: int,
    lose: int | None,
) -> None:
    """A write is copy 0, then copy 1, each one sector (a sector lands whole or not at all).
    Cut after ``cut`` of the two writes, and lose one copy on top: the reader sees the old or
    the new decision, the new one as soon as a surviving copy holds it."""
    d = tmp_path_factory.mktemp("env")
    store = GrubEnvStore((d / "0", d / "1"))
    before = store.write(old)
    after = BootEnv(before.seq + 1, new.order, new.states, new.tries)
    blocks = [encode_block(before.variables())] * 2
    for i in range(cut):
        blocks[i] = encode_block(after.variables())
    if lose is not None:
        blocks[lose] = b"\xa5" * BLOCK_SIZE
    for i, b in enumerate(blocks):
        (d / str(i)).write_bytes(b)
    survivors = [i for i in (0, 1) if i != lose]
    got = store.read()
    assert got == (after if any(i < cut for i in survivors) else before)
    assert (d / "0").read_bytes() == (d / "1").read_bytes() == encode_block(got.variables())


def test_corrupt_copy_is_repaired_from_the_other(tmp_path: Path) -> None:
    store = GrubEnvStore((tmp_path / "0", tmp_path / "1"))
    e = store.write(initial_env(0))
    (tmp_path / "0").write_bytes(b"\xff" * BLOCK_SIZE)
    assert store.read() == e
    assert (tmp_path / "0").read_bytes() == (tmp_path / "1").read_bytes()
    (tmp_path / "0").write_bytes(b"junk")
    (tmp_path / "1").write_bytes(b"junk")
    with pytest.raises(OtaError) as ei:
        store.read()
    assert ei.value.code == ErrorCode.BOOT_ENV


# --- the CLI and the service plumbing --------------------------------------------------------
def test_agent_cli_errors_are_one_line_with_a_code(
    tmp_path: Path, rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    from otaguard.cli.main import main

    assert main(["agent", "status", "--config", str(tmp_path / "missing.toml")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("otaguard: error E_CONFIG:"), err
    (rig.d / "cmdline").write_text("ro quiet\n")  # not booted through otaguard's grub.cfg
    assert main(["agent", "boot-check", "--config", str(rig.cfg.path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("otaguard: error E_BOOT_ENV:"), err
    assert main(["agent", "install", "--config", str(rig.cfg.path), str(tmp_path)]) == 2
    assert "E_USAGE" in capsys.readouterr().err


def test_agent_status_reports_file_storage_and_grub_env(
    rig: Rig, capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    from otaguard.cli.main import main

    rig.boot(0).assess()
    assert main(["agent", "status", "--config", str(rig.cfg.path), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["storage"] == "file" and st["running_slot"] == "A"
    assert st["bootloader"] == {
        "type": "grub",
        "order": ["A", "B"],
        "states": ["good", "bad"],
        "tries": [0, 0],
    }
    assert st["boot"] == {"slot": "A", "mode": "normal"}


def test_sd_notify_reaches_the_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from otaguard.device.linux.service import sd_notify

    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sd_notify("READY=1") is False  # not under systemd: nothing to do
    path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert sd_notify("WATCHDOG=1") is True
        assert s.recv(100) == b"WATCHDOG=1"


def test_outbox_survives_until_sent(tmp_path: Path) -> None:
    from otaguard.device.linux.system import drain_outbox, write_outbox

    write_outbox(tmp_path, {"event": "confirmed", "version": "2.0.0"})
    write_outbox(tmp_path, {"event": "reverted", "error": "E_SELF_TEST"})
    with (tmp_path / "outbox.jsonl").open("ab") as f:
        f.write(b'{"event": "torn')  # a power cut in the middle of the last append
    sent: list[dict[str, object]] = []

    def fail(_e: dict[str, object]) -> None:
        raise OtaError(ErrorCode.TRANSPORT, "offline")

    with pytest.raises(OtaError):
        drain_outbox(tmp_path, fail)
    assert (tmp_path / "outbox.jsonl").exists()  # nothing lost while offline
    assert drain_outbox(tmp_path, sent.append) == 2
    assert [e["event"] for e in sent] == ["confirmed", "reverted"]
    assert not (tmp_path / "outbox.jsonl").exists()


def test_deleted_counter_file_is_tamper_not_zero(rig: Rig) -> None:
    dev = rig.boot(0)
    dev.assess()
    new = image("1.1.0")
    dev.install(MemoryTransport(rig.lab.release(new, version="1.1.0", seq=2, counter=5), new))
    dev = rig.boot(1)
    dev.assess()
    dev.run_self_test(lambda _b: True)
    (rig.cfg.state_dir / "counters.rec").unlink()  # someone with the data partition
    with pytest.raises(OtaError) as ei:
        rig.boot(1).assess()
    assert ei.value.code == ErrorCode.STORAGE


def test_install_from_url_verifies_manifest_before_the_image(
    rig: Rig, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`agent install http://...`: a release directory over HTTP on loopback. A manifest the
    device refuses stops it before image.bin is requested; a good one installs."""
    import functools
    import http.server
    import threading

    from otaguard.cli.main import main

    rel = tmp_path / "rel"
    rel.mkdir()
    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            requested.append(self.path)
            super().do_GET()

        def log_message(self, *_a: object) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(tmp_path))
    )
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{srv.server_address[1]}/rel"
    rig.boot(0).assess()
    try:
        old = image("0.9.0")
        (rel / "image.bin").write_bytes(old)
        (rel / "manifest.suit").write_bytes(
            rig.lab.release(old, version="0.9.0", seq=3, counter=0)  # below the device's 1
        )
        assert main(["agent", "install", "--config", str(rig.cfg.path), url]) == 1
        assert "E_SECURITY_COUNTER" in capsys.readouterr().err
        assert requested == ["/rel/manifest.suit"]  # the image was never asked for
        new = image("1.2.0")
        (rel / "image.bin").write_bytes(new)
        (rel / "manifest.suit").write_bytes(rig.lab.release(new, version="1.2.0", seq=4, counter=2))
        assert main(["agent", "install", "--config", str(rig.cfg.path), url, "--json"]) == 0
        assert "/rel/image.bin" in requested
    finally:
        srv.shutdown()
    assert rig.env().states == ("good", "pending")
    assert (rig.d / "slot-b.img").read_bytes()[: len(new)] == new


@given(st.lists(st.binary(max_size=50), max_size=10), st.integers(0, 600))
def test_from_offset_drops_exactly_the_prefix(chunks: list[bytes], skip: int) -> None:
    """A server that ignores Range sends the whole body: the download must continue at the
    requested offset, never repeat or lose a byte (HTTPS client and URL install alike)."""
    from otaguard.device.transport import from_offset

    whole = b"".join(chunks)
    out = list(from_offset(iter(chunks), skip))
    assert b"".join(out) == whole[skip:]
    assert all(out)  # no empty chunks handed to the slot writer
