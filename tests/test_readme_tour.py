"""The README's CLI tour and the incident runbook of docs/operations.md, run verbatim.

The fenced blocks marked ``<!-- tour: ... -->`` are extracted and run with bash (``-e -o
pipefail``) in a fresh directory: SoftHSM2 tokens, signed releases with a delta, the update
server over TLS in the background, publish, campaign, a device updating over mTLS, a refused
rollback, a key rotation, a revoked device, then the forced incident rotation. The docs are the
test's script: change one and this test runs the change.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
from pathlib import Path

from .support import require_binary, softhsm_module

ROOT = Path(__file__).resolve().parent.parent
MARKER = re.compile(r"^<!-- tour:")
FENCE = re.compile(r"^```(\w*)\s*$")


def tour_blocks(doc: Path) -> list[str]:
    """The ``sh`` blocks that directly follow a ``<!-- tour: ... -->`` line."""
    lines = doc.read_text().splitlines()
    blocks: list[str] = []
    i = 0
    while i < len(lines):
        if MARKER.match(lines[i]):
            m = FENCE.match(lines[i + 1]) if i + 1 < len(lines) else None
            assert m is not None and m.group(1) == "sh", f"{doc}:{i + 1}: marker without sh block"
            end = next(j for j in range(i + 2, len(lines)) if lines[j].startswith("```"))
            blocks.append("\n".join(lines[i + 2 : end]) + "\n")
            i = end
        i += 1
    return blocks


def test_blocks_are_found() -> None:
    readme = tour_blocks(ROOT / "README.md")
    runbook = tour_blocks(ROOT / "docs" / "operations.md")
    assert len(readme) == 1 and len(runbook) == 1
    for block in readme + runbook:
        assert "..." not in block and "<A>" not in block  # no placeholders in a script


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin_dir(tmp: Path) -> Path:
    """``otaguard`` on PATH as this interpreter runs it (the tree under test, not whatever
    an installed entry point points at)."""
    d = tmp / "bin"
    d.mkdir()
    exe = d / "otaguard"
    exe.write_text(f'#!/bin/sh\nexec {sys.executable} -m otaguard.cli.main "$@"\n')
    exe.chmod(0o755)
    return d


def _otaguard(work: Path, env: dict[str, str], *args: str) -> object:
    out = subprocess.run(
        [sys.executable, "-m", "otaguard.cli.main", *args],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_readme_tour_and_incident_runbook(tmp_path: Path) -> None:
    softhsm_module()
    for tool in ("softhsm2-util", "jq"):
        require_binary(tool)
    script = "".join(tour_blocks(ROOT / "README.md") + tour_blocks(ROOT / "docs/operations.md"))
    work = tmp_path / "tour"
    work.mkdir()
    (tmp_path / "tour.sh").write_text(script)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTAGUARD_", "SOFTHSM"))}
    env.update(
        PATH=f"{_bin_dir(tmp_path)}{os.pathsep}{env.get('PATH', '')}",
        OTAGUARD_PKCS11_MODULE=softhsm_module(),
        OTAGUARD_PKCS11_PIN=secrets.token_hex(8),
        SO_PIN=secrets.token_hex(8),
        OTAGUARD_CA_PASSPHRASE=secrets.token_hex(16),
        DEVICE_PORT=str(_free_port()),
        ADMIN_PORT=str(_free_port()),
    )
    # Its own session: the server the script leaves running in the background is in the
    # script's process group, which is ended below whatever happened. Output goes to files:
    # the server keeps inherited pipes open after the script is done.
    out_f, err_f = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    with out_f.open("w") as fo, err_f.open("w") as fe:
        proc = subprocess.Popen(
            ["bash", "-e", "-o", "pipefail", str(tmp_path / "tour.sh")],
            cwd=work,
            env=env,
            stdout=fo,
            stderr=fe,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=300)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
    out, err = out_f.read_text(), err_f.read_text()
    assert rc == 0, f"tour failed\n--- stdout\n{out[-4000:]}\n--- stderr\n{err[-4000:]}"

    # The rollback attempt and the revoked device were refused with these codes, one line each.
    assert re.search(r"^otaguard: error E_SECURITY_COUNTER: .*rollback", err, re.M), err
    assert re.search(r"^otaguard: error E_CERT_REVOKED: check-in refused", err, re.M), err
    # The device ends on the incident patch, under key list v5 (C only, A and B revoked) ...
    env.pop("OTAGUARD_PKCS11_PIN")
    status = _otaguard(work, env, "device", "status", "--dir", "dev1", "--json")
    assert isinstance(status, dict)
    active = status["slots"]["AB".index(status["boot_state"]["active"])]
    assert active["version"] == "2.5.1" and status["keylist_version"] == 5
    assert status["boot_state"]["pending"] is None
    # ... having taken 2.4.1 from the server as a delta; the second publish changed nothing.
    sync = json.loads((work / "sync.json").read_text())
    assert sync["outcome"] == "confirmed" and sync["method"] == "delta"
    assert sync["version"] == "2.4.1"
    assert "already published: release 1" in out and "delta 1 from 2.3.0: already there" in out
