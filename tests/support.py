"""Test helpers shared by every suite.

A missing external component (SoftHSM2, PostgreSQL, nginx, ...) skips the tests that need it on
a developer laptop, but under CI=true it fails the run: a green CI must mean the tests ran.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def missing(what: str) -> None:
    if IN_CI:
        pytest.fail(f"required component missing under CI=true: {what}", pytrace=False)
    pytest.skip(f"{what} not available")


def stop_process(proc: subprocess.Popen[Any]) -> None:
    """SIGTERM, then SIGKILL if it has not gone within 10 s; reaped either way."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        for pattern in (f"/usr/lib/postgresql/*/bin/{name}", f"/usr/sbin/{name}"):
            hits = sorted(glob.glob(pattern))
            if hits:
                return hits[-1]
        missing(f"binary {name!r}")
        raise AssertionError("unreachable")
    return path


SOFTHSM_MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)


def softhsm_module() -> str:
    for path in SOFTHSM_MODULE_CANDIDATES:
        if os.path.exists(path):
            return path
    missing("SoftHSM2 PKCS#11 module (libsofthsm2.so)")
    raise AssertionError("unreachable")


def server_run_argv(data: Path, tls: Path, *extra: str) -> list[str]:
    """``otaguard server run`` on ephemeral ports with the TLS files of ``tls`` (ca.pem,
    server.pem, server.key), as a subprocess argv; ``extra`` options go last."""
    return [
        sys.executable,
        "-m",
        "otaguard.cli.main",
        "server",
        "run",
        "--data-dir",
        str(data),
        "--ca-cert",
        str(tls / "ca.pem"),
        "--tls-cert",
        str(tls / "server.pem"),
        "--tls-key",
        str(tls / "server.key"),
        "--port",
        "0",
        "--admin-port",
        "0",
        *extra,
    ]
