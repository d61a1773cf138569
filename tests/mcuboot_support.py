"""MCUboot's own imgtool (PyPI ``imgtool``) as the independent verifier of our images.

Run as a subprocess (``python -m imgtool.main``), with the public key as PEM: imgtool's key
loader accepts a public key for ``verify``, so no private key ever reaches a file.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from otaguard.crypto.keys import PublicKey

from .support import missing


def _imgtool(*args: str) -> subprocess.CompletedProcess[str]:
    try:
        import imgtool  # noqa: F401
    except ImportError:
        missing("imgtool (PyPI)")
    return subprocess.run(
        [sys.executable, "-m", "imgtool.main", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def imgtool_verify(image: Path, key: PublicKey) -> subprocess.CompletedProcess[str]:
    pem = image.with_name(image.name + f".{key.key_id.hex()}.pub.pem")
    pem.write_bytes(key.to_pem())
    return _imgtool("verify", "-k", str(pem), str(image))


def assert_imgtool_accepts(image: Path, key: PublicKey) -> None:
    r = imgtool_verify(image, key)
    assert r.returncode == 0 and "Image was correctly validated" in r.stdout, r.stdout + r.stderr


def assert_imgtool_refuses(image: Path, key: PublicKey) -> str:
    r = imgtool_verify(image, key)
    assert r.returncode != 0, r.stdout
    assert "correctly validated" not in r.stdout
    return r.stdout


def imgtool_dumpinfo(image: Path) -> dict[str, Any]:
    out = image.with_name(image.name + ".info.json")
    r = _imgtool("dumpinfo", "-f", "json", "-o", str(out), str(image))
    if r.returncode != 0:
        pytest.fail(f"imgtool dumpinfo failed: {r.stdout}{r.stderr}")
    info: dict[str, Any] = json.loads(out.read_text())
    return info


def sec_cnt_of(info: dict[str, Any]) -> int:
    tlvs = [t for t in info["tlv_area"]["tlvs_prot"] if t["type_name"] == "SEC_CNT"]
    assert len(tlvs) == 1
    return int.from_bytes(bytes.fromhex(tlvs[0]["data"]), "little")
