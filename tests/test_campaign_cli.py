"""``otaguard campaign ...`` against a real admin listener (server TLS, bearer token)."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otaguard.cli.main import main
from otaguard.device.lab import Lab
from otaguard.server.context import TrustState
from otaguard.server.pki.ca import FleetCA
from otaguard.trust.model import StaticKeys
from tests.campaign_fleet import Fleet, release, token
from tests.pg import Harness, fleet_ca, harness, server_tls  # noqa: F401
from tests.test_campaign_server import client


@pytest.fixture
def setup(
    fleet_ca: FleetCA, server_tls: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Harness, Fleet, list[str]]]:
    from otaguard.server.storage.db import sqlite_url

    lab = Lab()
    trust = TrustState(StaticKeys([lab.op.public_key]))
    with harness(
        sqlite_url(tmp_path / "db.sqlite"), fleet_ca, server_tls, tmp_path, trust=trust
    ) as h:
        fleet = Fleet(
            lab, h.db, lambda s: h.enroll(s, model=lab.model, hw_rev=lab.hw_rev), h.url, tmp_path
        )
        assert h.admin_server is not None
        common = ["--server", h.admin_server.url, "--ca-file", str(server_tls / "ca.pem")]
        monkeypatch.setenv("OTAGUARD_ADMIN_TOKEN", token(h.db, "operator"))
        try:
            yield h, fleet, common
        finally:
            fleet.close()


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    try:
        data = json.loads(out) if out.strip().startswith(("{", "[")) else out
    except ValueError:
        data = out
    return code, data, err


def test_campaign_cli_lifecycle(
    setup: tuple[Harness, Fleet, list[str]],
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    h, fleet, common = setup
    for i in range(4):
        fleet.add(f"SN-L{i}")
    fleet.poll_all()
    rid = release(client(h, "release-manager"), fleet.lab, "1.1.0", 2)
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"failure": {"max_failed": 1, "min_finished": 1}}))
    code, out, err = run(
        capsys, "campaign", "create", "cli-1", "--release-id", str(rid), "--model",
        fleet.lab.model, "--phase", "0.5", "--phase", "1", "--spec", str(spec), *common, "--json",
    )  # fmt: skip
    assert code == 0, err
    assert out["status"] == "draft" and [p["fraction"] for p in out["phases"]] == [0.5, 1.0]
    code, out, err = run(capsys, "campaign", "start", "cli-1", *common, "--json")
    assert code == 0 and out["status"] == "running" and out["quota"] == 2
    fleet.poll_all()
    code, out, err = run(capsys, "campaign", "status", "cli-1", *common, "--json")
    assert code == 0 and out["counts"]["succeeded"] >= 2
    code, out, err = run(capsys, "campaign", "status", "cli-1", *common)
    assert code == 0 and "campaign   cli-1" in out and "succeeded=" in out
    code, out, err = run(capsys, "campaign", "pause", "cli-1", "--reason", "lunch", *common)
    assert code == 0 and "paused     lunch" in out
    code, out, err = run(capsys, "campaign", "pause", "cli-1", *common)
    assert code == 1 and "E_CAMPAIGN_STATE" in err
    code, out, err = run(capsys, "campaign", "resume", "cli-1", *common, "--json")
    assert code == 0 and out["status"] == "running"
    fleet.poll_all()
    code, out, err = run(capsys, "campaign", "list", *common, "--json")
    assert code == 0 and [(c["id"], c["status"]) for c in out] == [("cli-1", "completed")]
    code, out, err = run(capsys, "campaign", "abort", "cli-1", *common)
    assert code == 1 and "E_CAMPAIGN_STATE" in err
    # Refusals carry the server's code; a viewer may read but not act.
    code, out, err = run(
        capsys, "campaign", "create", "cli-2", "--release-id", str(rid), "--model", "other",
        *common,
    )  # fmt: skip
    assert code == 1 and "E_INCOMPATIBLE" in err
    monkeypatch.setenv("OTAGUARD_ADMIN_TOKEN", token(h.db, "viewer"))
    code, out, err = run(capsys, "campaign", "list", "--status", "completed", *common)
    assert code == 0 and out.startswith("cli-1")
    code, out, err = run(capsys, "campaign", "pause", "cli-1", *common)
    assert code == 1 and "E_FORBIDDEN" in err
    monkeypatch.delenv("OTAGUARD_ADMIN_TOKEN")
    code, out, err = run(capsys, "campaign", "list", *common)
    assert code == 1 and "OTAGUARD_ADMIN_TOKEN" in err
