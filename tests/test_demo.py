"""A small `otaguard demo`: real server, real HTTPS, real device runtimes on simulated time.

Asserts the demo's three checks (no attack accepted, no device bricked, fleet converged) with
every attack kind exercised, power cuts, link drops and self-test failures injected."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from otaguard.cli.main import cli
from otaguard.sim.model import ATTACK_KINDS


def test_small_demo_checks_pass(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    res = CliRunner().invoke(
        cli,
        [
            "simulate", "--devices", "45", "--days", "4", "--phases", "20:1h,100",
            "--attack-rate", "0.2", "--powercut-rate", "0.3", "--selftest-fail-rate", "0.1",
            "--image-size", "65536", "--rotation", "--keys", "software", "--seed", "3",
            "--drop-rate", "0.3",
            "--out", str(out), "--quiet",
        ],
    )  # fmt: skip
    report = json.loads((out / "report.json").read_text())
    assert res.exit_code == 0, (res.output, report["checks"], report["fleet"])
    assert report["checks"] == {
        "no_attack_accepted": True,
        "no_device_bricked": True,
        "fleet_converged": True,
    }
    by_kind = report["attacks"]["by_kind"]
    assert set(by_kind) == set(ATTACK_KINDS), by_kind
    for kind, outcomes in by_kind.items():
        assert "ACCEPTED" not in outcomes, (kind, outcomes)
        assert any(k.startswith("E_") for k in outcomes), (kind, outcomes)
    assert by_kind["revoked-cert"] == {"E_CERT_REVOKED": 3}
    assert set(by_kind["no-cert"]) == {"E_CERT"}
    assert report["faults"]["power_cuts"] > 0
    assert report["faults"]["self_test_reverts"] > 0
    assert report["faults"]["link_drops"] > 0  # injected under downloads, resumed or retried
    assert report["traffic"]["bytes_delta"] > 0
    assert report["key_rotation"]["time_to_keylist_h"]["t100_h"] is not None
    # polls overlap the next quanta, but the clock never ran past the lookahead during one
    assert 0 <= report["clock"]["max_poll_drift_s"] <= report["clock"]["lookahead_s"]
    for png in ("patched.png", "failures.png", "bytes.png"):
        assert (out / png).stat().st_size > 1000
