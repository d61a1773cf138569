"""U-Boot boot control on the host: Debian's real ``fw_printenv``/``fw_setenv`` (libubootenv)
on a file standing in for the disk, checked against an independent model of U-Boot's
redundant-environment rule (tests/ubootenv.py). The same decisions (GrubBootControl, the
boot state machine) drive it as GRUB's env; real U-Boot runs files/boot.cmd in tests/vm/.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otaguard.device.lab import Lab, MemoryTransport
from otaguard.device.linux.config import AgentConfig
from otaguard.device.linux.grub import GrubBootControl
from otaguard.device.linux.grubenv import BootEnv, initial_env
from otaguard.device.linux.system import RebootRequested
from otaguard.device.linux.uboot import UBootEnvStore, parse_fw_env_config
from otaguard.errors import ErrorCode, OtaError

from . import ubootenv
from .support import missing
from .test_linux_agent import Rig, image, write_config

FILES = Path(__file__).resolve().parents[1] / "src" / "otaguard" / "device" / "linux" / "files"
SIZE = 0x2000
OFFSETS = (0x40000, 0x42000)


@pytest.fixture(autouse=True)
def _tools() -> None:
    for tool in ("fw_printenv", "fw_setenv"):
        if shutil.which(tool) is None:
            missing(f"program {tool!r} (Debian package libubootenv-tool)")


def make_env_device(d: Path) -> Path:
    """A blank 'disk' with the env area, and a fw_env.config for it."""
    disk = d / "disk.img"
    with disk.open("wb") as f:
        f.truncate(OFFSETS[1] + SIZE + 4096)
    cfg = d / "fw_env.config"
    cfg.write_text("".join(f"{disk} {hex(o)} {hex(SIZE)}\n" for o in OFFSETS))
    return cfg


def copies(cfg: Path) -> tuple[bytes, bytes]:
    a, b = parse_fw_env_config(cfg.read_text())
    data = a.device.read_bytes()
    return data[a.offset : a.offset + a.size], data[b.offset : b.offset + b.size]


def put_copies(cfg: Path, c0: bytes, c1: bytes) -> None:
    a, b = parse_fw_env_config(cfg.read_text())
    with a.device.open("r+b") as f:
        f.seek(a.offset)
        f.write(c0)
        f.seek(b.offset)
        f.write(c1)


def model_env(cfg: Path) -> BootEnv:
    v = ubootenv.read(*copies(cfg))
    assert v is not None
    return BootEnv.from_variables(v)


class URig(Rig):
    """tests/test_linux_agent.py's device on files, booted through U-Boot's env instead."""

    def __init__(self, d: Path, lab: Lab) -> None:
        super().__init__(d, lab)
        self.fw = make_env_device(d)
        boot = f'type = "uboot"\nfw_env_config = "{self.fw}"\ncmdline = "{d / "cmdline"}"'
        self.cfg = AgentConfig.load(write_config(d, bootloader=boot))

    def env(self) -> BootEnv:
        got = UBootEnvStore(self.fw).read()
        assert got == model_env(self.fw)  # libubootenv and U-Boot's rule agree
        return got


@pytest.fixture
def urig(tmp_path: Path) -> URig:
    r = URig(tmp_path, Lab(now=int(time.time())))
    r.provision(image("1.0.0"))
    return r


def test_update_confirm_through_uboot_env(urig: URig) -> None:
    assert urig.cfg.bootloader == "uboot"
    dev = urig.boot(0)
    assert dev.assess().mode == "normal"
    assert urig.env().order == ("A", "B") and urig.env().states == ("good", "bad")
    new = image("1.1.0")
    dev.install(MemoryTransport(urig.lab.release(new, version="1.1.0", seq=2, counter=2), new))
    e = urig.env()
    assert e.order == ("B", "A") and e.states == ("good", "pending") and e.tries == (0, 3)
    with pytest.raises(RebootRequested):
        dev.boot()
    # U-Boot (boot.cmd) counts one try down in the copy it read, then starts B
    put_copies(urig.fw, *ubootenv.countdown(*copies(urig.fw), "B"))
    assert urig.env().tries == (0, 2)
    dev = urig.boot(1)
    res = dev.assess()
    assert (res.slot_name, res.mode, res.version) == ("B", "test", "1.1.0")
    assert urig.env().tries == (0, 2)  # the boot check kept U-Boot's count
    assert dev.run_self_test(lambda _b: True) == "confirmed"
    e = urig.env()
    assert e.order == ("B", "A") and e.states == ("good", "good")
    assert urig.boot(1).assess().mode == "normal"


def test_uboot_giving_up_on_pending_slot_is_a_watchdog_revert(urig: URig) -> None:
    dev = urig.boot(0)
    dev.assess()
    new = image("1.1.0")
    dev.install(MemoryTransport(urig.lab.release(new, version="1.1.0", seq=2, counter=2), new))
    for _ in range(3):
        put_copies(urig.fw, *ubootenv.countdown(*copies(urig.fw), "B"))
    assert urig.env().tries == (0, 0)  # U-Boot now starts A
    res = urig.boot(0).assess()
    assert (res.slot_name, res.reverted) == ("A", ErrorCode.WATCHDOG.value)
    assert urig.env().states == ("good", "bad")


def test_self_test_failure_reverts_in_uboot_env(urig: URig) -> None:
    dev = urig.boot(0)
    dev.assess()
    new = image("1.1.0")
    dev.install(MemoryTransport(urig.lab.release(new, version="1.1.0", seq=2, counter=2), new))
    dev = urig.boot(1)
    dev.assess()
    assert dev.run_self_test(lambda _b: False) == "reverted"
    e = urig.env()
    assert e.order == ("A", "B") and e.states == ("good", "bad")


def test_no_valid_copy_refuses_install_before_a_byte(urig: URig) -> None:
    dev = urig.boot(0)
    dev.assess()
    put_copies(urig.fw, b"\x5a" * SIZE, b"\xa5" * SIZE)
    b_before = (urig.d / "slot-b.img").read_bytes()
    new = image("1.1.0")
    with pytest.raises(OtaError) as ei:
        dev.install(MemoryTransport(urig.lab.release(new, version="1.1.0", seq=2, counter=2), new))
    assert ei.value.code == ErrorCode.BOOT_ENV
    assert (urig.d / "slot-b.img").read_bytes() == b_before
    # the next boot check rewrites the env from the authenticated boot state
    urig.boot(0).assess()
    assert urig.env().order == ("A", "B") and urig.env().states[0] == "good"


def test_status_names_uboot(urig: URig, capsys: pytest.CaptureFixture[str]) -> None:
    from otaguard.cli.main import main

    urig.boot(0).assess()
    assert main(["agent", "status", "--config", str(urig.cfg.path), "--json"]) == 0
    st_ = json.loads(capsys.readouterr().out)
    assert st_["bootloader"] == {
        "type": "uboot",
        "order": ["A", "B"],
        "states": ["good", "bad"],
        "tries": [0, 0],
    }
    put_copies(urig.fw, b"\0" * SIZE, b"\0" * SIZE)
    assert main(["agent", "status", "--config", str(urig.cfg.path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bootloader"] == {
        "type": "uboot",
        "error": "E_BOOT_ENV",
    }
    urig.fw.write_text(f"{urig.d / 'disk.img'} 0x0 0x2000\n")  # one copy: not redundant
    assert main(["agent", "status", "--config", str(urig.cfg.path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bootloader"]["error"] == "E_CONFIG"


# --- the store on its own -------------------------------------------------------------------


def test_tool_and_config_failures_are_typed(tmp_path: Path) -> None:
    cfg = make_env_device(tmp_path)
    with pytest.raises(OtaError) as ei:
        UBootEnvStore(cfg).read()  # blank: no valid copy
    assert ei.value.code == ErrorCode.BOOT_ENV
    with pytest.raises(OtaError) as ei:
        UBootEnvStore(cfg, setenv=str(tmp_path / "no-such-fw_setenv")).write(initial_env(0))
    assert ei.value.code == ErrorCode.BOOT_ENV and "libubootenv-tool" in ei.value.detail
    with pytest.raises(OtaError) as ei:
        UBootEnvStore(tmp_path / "missing.config").read()
    assert ei.value.code == ErrorCode.BOOT_ENV
    disk = tmp_path / "never-written.img"
    for text in (
        f"{disk} 0x0 0x2000\n",  # one copy
        f"{disk} 0x0 0x2000\n{disk} 0x2000 0x1000\n",  # sizes differ
        f"{disk} 0x0 0x2000\n{disk} 0x1000 0x2000\n",  # overlap
        f"{disk} zero 0x2000\n{disk} 0x2000 0x2000\n",
        f"{disk}\n{disk} 0x2000 0x2000\n",
    ):
        bad = tmp_path / "bad.config"
        bad.write_text(text)
        store = UBootEnvStore(bad)
        with pytest.raises(OtaError) as ei:
            store.read()
        assert ei.value.code == ErrorCode.CONFIG, text
        with pytest.raises(OtaError) as ei:
            store.write(initial_env(0))
        assert ei.value.code == ErrorCode.CONFIG, text
        assert not disk.exists()  # nothing was written through it
    # the device named in the config is gone: fw_setenv fails, a typed error
    gone = tmp_path / "gone.config"
    gone.write_text(f"{tmp_path}/nodir/disk 0x0 0x2000\n{tmp_path}/nodir/disk 0x2000 0x2000\n")
    with pytest.raises(OtaError) as ei:
        UBootEnvStore(gone).write(initial_env(0))
    assert ei.value.code == ErrorCode.BOOT_ENV


def test_a_copy_without_our_variables_is_no_boot_state(tmp_path: Path) -> None:
    cfg = make_env_device(tmp_path)
    env = {"bootcmd": "run distro_bootcmd", "OG_ORDER": "B A"}  # valid CRC, not otaguard's
    put_copies(cfg, ubootenv.encode(env, SIZE, 1), b"\0" * SIZE)
    with pytest.raises(OtaError) as ei:
        UBootEnvStore(cfg).read()
    assert ei.value.code == ErrorCode.BOOT_ENV


def test_config_choice(tmp_path: Path) -> None:
    p = write_config(tmp_path, bootloader='type = "lilo"')
    with pytest.raises(OtaError) as ei:
        AgentConfig.load(p)
    assert ei.value.code == ErrorCode.CONFIG and "bootloader.type" in ei.value.detail
    cfg = AgentConfig.load(write_config(tmp_path, bootloader='type = "uboot"'))
    assert (cfg.bootloader, cfg.fw_env_config) == ("uboot", Path("/etc/otaguard/fw_env.config"))
    assert AgentConfig.load(write_config(tmp_path, bootloader="")).bootloader == "grub"


def test_shipped_fw_env_config_matches_boot_cmd() -> None:
    """The example fw_env.config and boot.cmd's mapping name the same bytes, and boot.cmd's
    literal sizes are the environment size's."""
    a, b = parse_fw_env_config((FILES / "fw_env.config").read_text())
    script = (FILES / "boot.cmd").read_text()

    def var(name: str) -> int:
        m = re.search(rf"^setenv {name} (0x[0-9a-f]+)$", script, re.M)
        assert m is not None, name
        return int(m[1], 16)

    assert (a.offset, b.offset) == (var("og_env_blk0") * 512, var("og_env_blk1") * 512)
    assert a.size == b.size == var("og_env_cnt") * 512
    assert a.device == b.device
    assert "0x1fff " in script and hex(a.size - 1) == "0x1fff"
    assert "0x1ffb;" in script and hex(a.size - 5) == "0x1ffb"


# --- power cuts -------------------------------------------------------------------------------

ops = st.lists(
    st.tuples(st.sampled_from(["pending", "confirmed", "reverted"]), st.integers(0, 1)),
    min_size=1,
    max_size=5,
)


@settings(max_examples=25, deadline=None)
@given(ops=ops, start_flags=st.integers(0, 255), cut=st.integers(0, SIZE), countdown=st.booleans())
def test_a_torn_write_leaves_the_last_completed_state(
    tmp_path_factory: pytest.TempPathFactory,
    ops: list[tuple[str, int]],
    start_flags: int,
    cut: int,
    countdown: bool,
) -> None:
    """Any sequence of boot-control writes through fw_setenv, then one more whose copy is
    torn at byte ``cut``: U-Boot's rule (the model) and libubootenv both read the last
    completed state; each write replaced exactly one copy; flags wrap at 255. With
    ``countdown``, U-Boot's in-place count-down is the torn write instead: the fallback is
    never a state that gives the pending slot more tries."""
    d = tmp_path_factory.mktemp("uenv")
    cfg = make_env_device(d)
    first = initial_env(0).variables()
    put_copies(
        cfg,
        ubootenv.encode(first, SIZE, start_flags),
        ubootenv.encode(first, SIZE, (start_flags - 1) % 256),
    )
    store = UBootEnvStore(cfg)
    control = GrubBootControl(store, running=0, max_tries=3, has_image=lambda _i: True)

    def steps(op: str, slot: int) -> list[Callable[[], None]]:
        """The agent's env writes for one decision (a new slot is first taken out)."""
        if op == "pending":
            return [lambda: control.disable(slot), lambda: control.pending(slot, 1 - slot)]
        if op == "confirmed":
            return [lambda: control.confirmed(slot)]
        return [lambda: control.reverted(slot, 1 - slot)]

    todo = [s for op, slot in ops for s in steps(op, slot)]
    for step in todo[:-1]:
        before = copies(cfg)
        step()
        after = copies(cfg)
        assert sum(x != y for x, y in zip(before, after, strict=True)) <= 1  # one copy a write
        assert model_env(cfg) == store.read()
    last = store.read()
    before = copies(cfg)
    if countdown and last.states["AB".index(last.order[0])] == "pending":
        after = ubootenv.countdown(*before, last.order[0])
    else:
        countdown = False
        todo[-1]()
        after = copies(cfg)
    changed = [i for i in (0, 1) if before[i] != after[i]]
    assert len(changed) <= 1
    if not changed:
        return
    i = changed[0]
    torn = list(before)
    torn[i] = after[i][:cut] + before[i][cut:]
    put_copies(cfg, *torn)
    got = model_env(cfg)
    assert store.read() == got  # libubootenv agrees with U-Boot's rule
    if torn[i] == after[i]:
        assert got == BootEnv.from_variables(ubootenv.variables(after[i]))
    elif countdown:
        # torn in place: the other copy, the agent's previous decision, is in force
        pend = "AB".index(last.order[0])
        assert got.states[pend] != "pending" or got.tries[pend] <= last.tries[pend]
    else:
        assert got == last


def test_boot_cmd_imports_and_writes_only_our_variables() -> None:
    """Every ``env import`` in boot.cmd names its variables (U-Boot would otherwise take
    bootcmd & co. from a forged copy) and every import/export names only otaguard's."""
    ours = set(initial_env(0).variables())
    script = (FILES / "boot.cmd").read_text()
    code = [line.split("#", 1)[0] for line in script.splitlines()]
    uses = [m for line in code for m in re.findall(r"env (?:import|export) ([^;']*)", line)]
    assert len(uses) >= 5
    for use in uses:
        names = [w for w in use.split() if not w.startswith(("-", "0x"))]
        assert names and set(names) <= ours, use
