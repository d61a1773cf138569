"""Shared fixtures. ``softhsm_token``: a fresh, initialized SoftHSM2 token for one test.

SoftHSM2 reads ``SOFTHSM2_CONF`` when the PKCS#11 module is initialized, and a module is
initialized once per process. So each test process (xdist worker) gets ONE token directory and
config, set in the environment before anything loads the module, and every test gets its own
token (unique label, random PINs) inside it. ``otaguard.crypto.pkcs11`` re-initializes the
module when a token it is asked for is not visible yet (only while no session is open), which
is how tokens created here after the first initialization become visible.
"""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from otaguard.crypto.pkcs11 import MODULE_ENV, Pkcs11Uri

from .support import require_binary, softhsm_module


@dataclass(frozen=True)
class SoftHsmToken:
    module: str  # path of libsofthsm2.so
    label: str  # token label, unique per test
    pin: str  # user PIN
    so_pin: str  # security-officer PIN
    conf: Path  # the SOFTHSM2_CONF file in effect for this process
    util: str  # path of softhsm2-util

    def uri(self, object: str | None = None, *, id: bytes | None = None) -> str:
        """``pkcs11:token=<label>[;object=...][;id=...]`` with proper percent-encoding."""
        return str(Pkcs11Uri(token=self.label, object=object, id=id))

    def env(self) -> dict[str, str]:
        """Environment for a subprocess (CLI) that should see this token."""
        return {**os.environ, "SOFTHSM2_CONF": str(self.conf), MODULE_ENV: self.module}


@dataclass(frozen=True)
class _SoftHsmDir:
    module: str
    util: str
    conf: Path
    tokens: Path


@pytest.fixture(scope="session")
def _softhsm_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[_SoftHsmDir]:
    module = softhsm_module()
    util = require_binary("softhsm2-util")
    base = tmp_path_factory.mktemp("softhsm")
    tokens = base / "tokens"
    tokens.mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n"
        "slots.removable = false\n"
    )
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    try:
        yield _SoftHsmDir(module, util, conf, tokens)
    finally:
        if old is None:
            os.environ.pop("SOFTHSM2_CONF", None)
        else:
            os.environ["SOFTHSM2_CONF"] = old


@pytest.fixture
def softhsm_token(_softhsm_dir: _SoftHsmDir, monkeypatch: pytest.MonkeyPatch) -> SoftHsmToken:
    d = _softhsm_dir
    # The session fixture set it, but a test may have replaced os.environ meanwhile.
    monkeypatch.setenv("SOFTHSM2_CONF", str(d.conf))
    monkeypatch.setenv(MODULE_ENV, d.module)
    token = SoftHsmToken(
        module=d.module,
        label=f"t-{secrets.token_hex(6)}",
        pin=secrets.token_hex(8),
        so_pin=secrets.token_hex(8),
        conf=d.conf,
        util=d.util,
    )
    proc = subprocess.run(
        [
            d.util,
            "--init-token",
            "--free",
            "--label",
            token.label,
            "--so-pin",
            token.so_pin,
            "--pin",
            token.pin,
        ],
        env={**os.environ, "SOFTHSM2_CONF": str(d.conf)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if proc.returncode != 0:
        pytest.fail(f"softhsm2-util --init-token failed: {proc.stderr.strip()}", pytrace=False)
    return token
