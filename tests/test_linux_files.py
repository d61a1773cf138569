"""The files the project ships for Linux devices: systemd units, example config, grub.cfg."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from otaguard.device.linux.config import AgentConfig
from otaguard.device.linux.grubenv import initial_env
from tests.support import require_binary

FILES = Path(__file__).resolve().parents[1] / "src/otaguard/device/linux/files"
UNITS = sorted(FILES.glob("*.service"))


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = require_binary("systemd-analyze")
    otaguard = shutil.which("otaguard", path=str(Path(sys.executable).parent))
    assert otaguard is not None
    for unit in UNITS:
        text = unit.read_text().replace("/usr/bin/otaguard", otaguard)
        (tmp_path / unit.name).write_text(text)
    proc = subprocess.run(
        [tool, "verify", "--man=no", *(f"./{u.name}" for u in UNITS)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def test_units_order_boot_assessment() -> None:
    """boot-check before everything; self-test gates boot-complete.target; mark-good after it;
    the agent is a notify service with a watchdog."""
    units = {u.name: u.read_text() for u in UNITS}
    assert "Before=sysinit.target" in units["otaguard-boot-check.service"]
    st = units["otaguard-self-test.service"]
    assert "Before=boot-complete.target" in st and "RequiredBy=boot-complete.target" in st
    assert "OnFailure=otaguard-mark-bad.service" in st
    mg = units["otaguard-mark-good.service"]
    assert "After=boot-complete.target" in mg and "Requires=boot-complete.target" in mg
    ag = units["otaguard-agent.service"]
    assert "Type=notify" in ag and re.search(r"^WatchdogSec=\d+", ag, re.M)


def test_example_config_loads_and_pin_is_required(tmp_path: Path) -> None:
    cfg = AgentConfig.load(FILES / "agent.example.toml")
    assert cfg.spki_pins and cfg.self_test and cfg.max_tries == 3
    no_pin = (FILES / "agent.example.toml").read_text()
    no_pin = re.sub(r"^spki_pins = .*$", "", no_pin, flags=re.M)
    (tmp_path / "a.toml").write_text(no_pin)
    with pytest.raises(Exception, match="spki_pins"):
        AgentConfig.load(tmp_path / "a.toml")


def test_grub_cfg_loads_only_whitelisted_variables() -> None:
    cfg = (FILES / "grub.cfg").read_text()
    loads = [line for line in cfg.splitlines() if re.match(r"\s*(if\s+)?load_env\b", line)]
    assert loads, "grub.cfg never loads the env"
    owned = set(initial_env(0).variables()) - {"OG_SUM"}
    for line in loads:
        names = set(re.findall(r"\bOG_[A-Z_]+\b", line))
        assert names and names <= owned, line  # a whitelist, and never OG_SUM or anything else
