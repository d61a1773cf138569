"""Files holding the device registry, admin token hashes and the signing history are created
readable by their owner only (they were world-readable: the hardening issue)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from otaguard.server.runtime import open_database
from otaguard.signing.state import SigningState


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def test_server_database_and_its_directory_are_private(tmp_path: Path) -> None:
    old = os.umask(0o022)  # the usual umask: without care, files come out 0644
    try:
        db = open_database(tmp_path / "data", None)
        db.dispose()
    finally:
        os.umask(old)
    assert _mode(tmp_path / "data") == 0o700
    files = [p for p in (tmp_path / "data").iterdir() if p.name.startswith("otaguard.db")]
    assert files and all(_mode(p) == 0o600 for p in files), [(p.name, oct(_mode(p))) for p in files]


def test_an_existing_world_readable_database_is_made_private(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "otaguard.db").touch(mode=0o644)
    os.chmod(tmp_path / "data" / "otaguard.db", 0o644)
    open_database(tmp_path / "data", None).dispose()
    assert _mode(tmp_path / "data" / "otaguard.db") == 0o600


def test_signing_state_is_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        SigningState(tmp_path / "signing" / "state.db")
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "signing").iterdir() if p.name.startswith("state.db")]
    assert files and all(_mode(p) == 0o600 for p in files), [(p.name, oct(_mode(p))) for p in files]
    assert _mode(tmp_path / "signing") == 0o700
