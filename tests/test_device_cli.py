"""``otaguard device init/install/boot/status`` end to end, through the real CLI entry point."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from otaguard.cli.main import main
from otaguard.crypto.software import SoftwareSigner
from otaguard.device.lab import Lab, image_bytes

PASS = "correct horse battery"


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="otaguard.keys")


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_device_cli_lifecycle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTAGUARD_KEY_PASSPHRASE", PASS)
    key = tmp_path / "fw.key"
    SoftwareSigner.generate(key, "ed25519", PASS.encode())
    # the CLI device uses the real clock, so the lab's keys are made valid around now
    lab = Lab(op=SoftwareSigner.load(key, PASS.encode()), now=int(time.time()))
    (tmp_path / "trust.bundle").write_bytes(lab.bundle.to_bytes())
    v1, v2 = image_bytes(50_000, 1), image_bytes(70_000, 2)
    (tmp_path / "v1.bin").write_bytes(v1)
    (tmp_path / "v2.bin").write_bytes(v2)
    (tmp_path / "v2.suit").write_bytes(lab.release(v2, version="1.1.0", seq=2, counter=1))
    (tmp_path / "old.suit").write_bytes(lab.release(v2, version="1.1.0", seq=1, counter=1))
    d = str(tmp_path / "dev")
    common = ["--dir", d]

    rc, out, err = run(
        capsys,
        "device",
        "init",
        *common,
        "--trust",
        str(tmp_path / "trust.bundle"),
        "--vendor",
        "hvac.example.com",
        "--model",
        "ctl-9",
        "--hw-rev",
        "rev-b",
        "--version",
        "1.0.0",
        "--factory-image",
        str(tmp_path / "v1.bin"),
        "--key-file",
        str(key),
        "--slot-size",
        str(128 * 1024),
        "--json",
    )
    assert rc == 0, err
    status = json.loads(out)
    assert status["slots"][0]["version"] == "1.0.0" and status["boot_state"]["active"] == "A"

    rc, out, err = run(
        capsys,
        "device",
        "init",
        *common,
        "--trust",
        str(tmp_path / "trust.bundle"),
        "--vendor",
        "hvac.example.com",
        "--model",
        "ctl-9",
        "--hw-rev",
        "rev-b",
        "--version",
        "1.0.0",
        "--factory-image",
        str(tmp_path / "v1.bin"),
        "--key-file",
        str(key),
    )
    assert rc == 1 and "E_EXISTS" in err

    rc, out, err = run(
        capsys,
        "device",
        "install",
        *common,
        "--manifest",
        str(tmp_path / "v2.suit"),
        "--image",
        str(tmp_path / "v2.bin"),
        "--json",
    )
    assert rc == 0, err
    assert json.loads(out)["slot"] == "B"

    rc, out, err = run(capsys, "device", "boot", *common, "--self-test", "fail", "--json")
    assert rc == 0, err
    res = json.loads(out)
    assert (res["self_test"], res["version"], res["slot"]) == ("reverted", "1.0.0", "A")

    rc, out, err = run(
        capsys,
        "device",
        "install",
        *common,
        "--manifest",
        str(tmp_path / "v2.suit"),
        "--image",
        str(tmp_path / "v2.bin"),
    )
    assert rc == 0, err
    rc, out, err = run(capsys, "device", "boot", *common, "--self-test", "pass", "--json")
    res = json.loads(out)
    assert (res["self_test"], res["version"], res["mode"]) == ("confirmed", "1.1.0", "normal")

    rc, out, err = run(
        capsys,
        "device",
        "install",
        *common,
        "--manifest",
        str(tmp_path / "old.suit"),
        "--image",
        str(tmp_path / "v2.bin"),
    )
    assert rc == 1 and "E_REPLAY" in err

    rc, out, err = run(capsys, "device", "status", *common, "--json")
    s = json.loads(out)
    assert s["last_error"] == "E_REPLAY"
    assert s["counters"] == {"security": 1, "sequence": 2, "keylist_version": 1}
    assert s["boot_state"]["active"] == "B"
    rc, out, err = run(capsys, "device", "status", *common)
    assert "slot B      1.1.0" in out and "E_REPLAY" in out
    assert (tmp_path / "dev" / "reports.jsonl").read_text().count("\n") >= 3
