"""``otaguard simulate --serve`` (what ``otaguard demo --serve`` does after the full demo): the
simulated server's data is kept and its admin listener serves the dashboard to a person, who
logs in with the printed token and sees the run's campaigns; Ctrl-C stops it cleanly."""

from __future__ import annotations

import re
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.dashboard_support import csrf_of


@pytest.mark.slow
def test_simulation_then_serve_the_dashboard(tmp_path: Path) -> None:
    out = tmp_path / "sim"
    proc = subprocess.Popen(
        [sys.executable, "-m", "otaguard.cli.main", "simulate", "--devices", "20",
         "--days", "1", "--phases", "25:1h,100", "--keys", "software", "--seed", "5",
         "--image-size", "32768", "--attack-rate", "0", "--out", str(out), "--quiet",
         "--serve", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")))
    reader.start()  # (select() on the pipe would miss lines already in Python's buffer)
    try:
        deadline = time.monotonic() + 240
        while not any("Ctrl-C" in x for x in lines):
            assert time.monotonic() < deadline and proc.poll() is None, lines
            time.sleep(0.5)
        text = "".join(lines)
        url = re.search(r"dashboard: (https://127\.0\.0\.1:\d+)/ui/", text)
        token = re.search(r"operator token: (otg_\S+)", text)
        assert url is not None and token is not None, text
        assert (out / "server" / "otaguard.db").is_file()
        ctx = ssl.create_default_context(cafile=str(out / "server" / "tls" / "ca.pem"))
        with httpx.Client(base_url=url.group(1), verify=ctx, timeout=30) as c:
            page = c.get("/ui/login")
            r = c.post("/ui/login", data={"token": token.group(1), "csrf": csrf_of(page.text)})
            assert r.status_code == 303, r.text
            campaigns = c.get("/ui/campaigns")
            assert campaigns.status_code == 200 and "patch-1.1.0" in campaigns.text
            assert c.get("/ui/campaigns/patch-1.1.0").status_code == 200
            fleet = c.get("/ui/fleet").text
            assert "HVAC-000000" in fleet
        proc.send_signal(signal.SIGINT)  # what Ctrl-C in the terminal does
        assert proc.wait(timeout=60) == 0, "".join(lines)
        reader.join(timeout=10)
        assert "all checks passed" in "".join(lines[-3:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
