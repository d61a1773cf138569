"""Ctrl-C during a simulation (issue 8, "Bad input"): the terminal sends SIGINT to the whole
process group (the simulator, its server processes and its device shards); the run stops,
the partial report is written, no stack trace reaches the user and no process is left."""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest


def _read_until(proc: subprocess.Popen[str], marker: str, timeout: float) -> str:
    assert proc.stdout is not None
    seen = ""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        ready, _, _ = select.select([proc.stdout], [], [], 1.0)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            seen += line
            if marker in line:
                return seen
    pytest.fail(f"no {marker!r} within {timeout} s; output so far:\n{seen}")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("when", ["setup", "run"])
def test_ctrl_c_writes_the_partial_report_and_leaves_no_process(tmp_path: Path, when: str) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "otaguard.cli.main", "simulate",
            "--devices", "1500", "--days", "7", "--image-size", "65536",
            "--keys", "software", "--seed", "9", "--out", str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell job has
        env={**os.environ, "OTAGUARD_DEBUG": ""},
    )  # fmt: skip
    try:
        # "setup": while devices are being enrolled (1,500 take ~10 s; the first batch of
        # 250 is ready within ~2 s); "run": once the campaign runs
        _read_until(proc, "fleet:" if when == "run" else "enrolling", timeout=120)
        time.sleep(2.0)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0  # an interrupted run fails its checks
    assert "Traceback" not in stderr and "Traceback" not in stdout, stderr
    report = json.loads((out / "report.json").read_text())
    assert report["stopped"] == "interrupted (Ctrl-C)"
    assert report["checks"]["fleet_converged"] is False
    assert report["checks"]["no_device_bricked"] is True
    end = time.monotonic() + 20
    while _group_alive(proc.pid) and time.monotonic() < end:
        time.sleep(0.2)
    assert not _group_alive(proc.pid), "a server or shard process outlived the simulator"
