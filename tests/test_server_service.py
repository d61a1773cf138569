"""Running the server as a service: config file, /healthz, /metrics, systemd units."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import os
import re
import shutil
import ssl
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otaguard.cli.main import main as cli_main
from otaguard.cli.server import _KEY_OPTIONS
from otaguard.errors import ErrorCode, OtaError
from otaguard.server.config import _FIELDS, load_server_config, parse_server_config
from otaguard.server.context import TrustState
from otaguard.server.metrics import parse_samples
from otaguard.server.pki.ca import FleetCA
from otaguard.server.runtime import NodeLayout, RunOptions
from otaguard.server.storage import models, store
from otaguard.server.storage.db import sqlite_url
from otaguard.trust.model import StaticKeys
from tests.pg import Harness, fleet_ca, harness, server_tls  # noqa: F401
from tests.support import require_binary
from tests.test_server_api import SIGNER, admin, publish

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "src/otaguard/server/files/server.example.toml"
UNITS = [
    ROOT / "src/otaguard/server/files/otaguard-server.service",
    ROOT / "src/otaguard/signing/files/otaguard-signing.service",
]


# --- config file ---------------------------------------------------------------------------------
def test_example_config_parses_to_run_options() -> None:
    values = load_server_config(EXAMPLE)
    opts = RunOptions(**values)
    assert opts.ca_cert == Path("/etc/otaguard/fleet-ca.pem")
    assert opts.trust_bundle == Path("/etc/otaguard/trust-bundle.json")
    assert (opts.port, opts.admin_port, opts.device_burst) == (8443, 8444, 30)
    assert opts.header_timeout == 10.0 and opts.body_min_rate == 16384


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("colour = 'blue'\n", "unknown key colour"),
        ("[device]\nprot = 8443\n", "unknown key device.prot"),
        ("[devices]\nport = 1\n", "unknown section [devices]"),
        ("[device]\nport = '8443'\n", "device.port must be an integer"),
        ("[device]\nport = 70000\n", "device.port must be an integer"),
        ("[device]\nproxy_only = 1\n", "device.proxy_only must be true or false"),
        ("[device]\ntrusted_proxies = '10.0.0.1'\n", "device.trusted_proxies must be a list"),
        ("[limits]\nip_rate = true\n", "limits.ip_rate must be a number"),
        ("[listener]\nheader_timeout = 0\n", "listener.header_timeout must be a number"),
        ("[tls]\nkey = 3\n", "tls.key must be a non-empty path"),
        ("[trust]\nkeys = ['a.pem', 4]\n", "trust.keys must be a list"),
        ("db = 'postgresql://ota:hunter2@db/ota'\n", "db: no passwords in the config file"),
        ("port = [\n", "not valid TOML"),
    ],
)
def test_bad_config_is_e_config_naming_the_key(tmp_path: Path, text: str, key: str) -> None:
    p = tmp_path / "server.toml"
    p.write_text(text)
    with pytest.raises(OtaError) as exc:
        load_server_config(p)
    assert exc.value.code is ErrorCode.CONFIG and key in exc.value.detail


_SCALARS = st.one_of(
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.lists(st.text(max_size=6), max_size=3),
)
_KNOWN = sorted(_FIELDS)
_NAME = st.text("abcxyz./-_", min_size=1, max_size=10)
_VALID: dict[str, st.SearchStrategy[Any]] = {
    "trusted_keys": st.lists(_NAME, max_size=3),
    "trusted_proxies": st.lists(_NAME, max_size=3),
    "db_url": st.just("sqlite:////var/lib/x.db"),
    "host": _NAME,
    "admin_host": _NAME,
    "proxy_only": st.booleans(),
    "port": st.integers(0, 65535),
    "admin_port": st.integers(0, 65535),
    "device_burst": st.integers(1, 10**9),
    "ip_burst": st.integers(1, 10**9),
    "workers": st.integers(1, 64),
    "body_min_rate": st.integers(1, 1 << 40),
    "device_rate": st.floats(1e-6, 1e9),
    "ip_rate": st.floats(1e-6, 1e9),
    "header_timeout": st.floats(0.01, 86400),
    "body_timeout": st.floats(0.01, 86400),
}


@settings(max_examples=300, deadline=None)
@given(
    keys=st.lists(st.sampled_from(_KNOWN), max_size=6, unique=True),
    extra=st.dictionaries(st.text(min_size=1, max_size=8), _SCALARS, max_size=1),
    data=st.data(),
)
def test_config_parser_answers_with_values_or_e_config(
    keys: list[tuple[str, str]], extra: dict[str, Any], data: st.DataObject
) -> None:
    """Any document: RunOptions values, or E_CONFIG naming an offending key; nothing else."""
    doc: dict[str, Any] = {}
    for section, key in keys:
        valid = _VALID.get(_FIELDS[(section, key)], _NAME)
        value = data.draw(st.one_of(valid, valid, valid, _SCALARS))
        (doc.setdefault(section, {}) if section else doc)[key] = value
    for key, value in extra.items():
        doc.setdefault(key, value)
    try:
        values = parse_server_config(doc, Path("/etc/otaguard"))
    except OtaError as err:
        assert err.code is ErrorCode.CONFIG
        names = [f"{s}.{k}" if s else k for s, k in _FIELDS] + list(doc)
        assert any(n in err.detail for n in names), err.detail
        return
    assert set(values) == {_FIELDS[k] for k in keys}
    # key-naming values are opened by the CLI (cli/server.py) into RunOptions' keys
    plain = {k: v for k, v in values.items() if k not in _KEY_OPTIONS}
    opts = RunOptions(**{"data_dir": Path("d"), "ca_cert": Path("c"), **plain})
    for name, value in plain.items():  # every value lands in its field
        assert getattr(opts, name) == value


def _captured_options(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> RunOptions:
    seen: list[RunOptions] = []

    def run_node(load: Callable[[], RunOptions], layout: NodeLayout) -> None:
        opts = load()
        assert layout == NodeLayout.of(opts)  # listens where the options say
        seen.append(opts)

    monkeypatch.setattr("otaguard.server.runtime.run_node", run_node)
    assert cli_main(["server", "run", *argv]) == 0
    return seen[0]


def test_flags_override_the_file_and_paths_are_relative_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OTAGUARD_DB_URL", raising=False)
    monkeypatch.delenv("OTAGUARD_DATA_DIR", raising=False)
    cfg = tmp_path / "etc" / "server.toml"
    cfg.parent.mkdir()
    cfg.write_text(
        'data_dir = "data"\n[tls]\nca_cert = "ca.pem"\n[device]\nport = 9000\n'
        'trusted_proxies = ["10.0.0.0/8"]\n[admin]\nport = 9001\n'
    )
    opts = _captured_options(monkeypatch, ["--config", str(cfg), "--port", "9100"])
    assert opts.port == 9100  # the flag wins
    assert opts.admin_port == 9001  # the file wins over the flag's default
    assert opts.data_dir == cfg.parent / "data" and opts.ca_cert == cfg.parent / "ca.pem"
    assert opts.trusted_proxies == ["10.0.0.0/8"] and opts.host == "127.0.0.1"
    opts = _captured_options(
        monkeypatch, ["--config", str(cfg), "--trusted-proxy", "192.0.2.1", "--ca-cert", "x.pem"]
    )
    assert opts.trusted_proxies == ["192.0.2.1"] and opts.ca_cert == Path("x.pem")
    monkeypatch.setenv("OTAGUARD_DB_URL", "sqlite:////tmp/elsewhere.db")
    assert _captured_options(monkeypatch, ["--config", str(cfg)]).db_url == (
        "sqlite:////tmp/elsewhere.db"
    )


def test_ca_cert_required_from_flag_or_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = tmp_path / "server.toml"
    cfg.write_text("[device]\nport = 9000\n")
    assert cli_main(["server", "run", "--config", str(cfg)]) == 2
    assert "E_USAGE" in capsys.readouterr().err
    cfg.write_text("[device]\nport = 'x'\n")
    assert cli_main(["server", "run", "--config", str(cfg)]) == 1
    assert "error E_CONFIG: device.port" in capsys.readouterr().err


def test_server_runs_from_a_config_file(server_tls: Path, tmp_path: Path) -> None:
    """The real process, configured only by the file (ports 0: printed once bound)."""
    cfg = tmp_path / "server.toml"
    cfg.write_text(
        f'data_dir = "data"\n[tls]\nca_cert = "{server_tls / "ca.pem"}"\n'
        f'cert = "{server_tls / "server.pem"}"\nkey = "{server_tls / "server.key"}"\n'
        "[device]\nport = 0\n[admin]\nport = 0\n[listener]\nheader_timeout = 5.0\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "otaguard.cli.main", "server", "run", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening"), proc.stderr.read() if proc.stderr else line
        adm = line.split()[2].split("=")[1]
        ctx = ssl.create_default_context(cafile=str(server_tls / "ca.pem"))
        r = httpx.get(f"https://{adm}/healthz", verify=ctx, timeout=10)
        assert r.status_code == 200 and r.json()["ok"] is True
        assert (tmp_path / "data" / "otaguard.db").exists()  # data_dir relative to the file
    finally:
        proc.terminate()
        proc.wait(20)


# --- healthz ------------------------------------------------------------------------------------
@pytest.fixture
def h(fleet_ca: FleetCA, server_tls: Path, tmp_path: Path) -> Iterator[Harness]:
    with harness(
        sqlite_url(tmp_path / "otaguard.db"),
        fleet_ca,
        server_tls,
        tmp_path,
        trust=TrustState(StaticKeys([SIGNER.public_key])),
    ) as hh:
        yield hh


def _health(c: httpx.Client) -> tuple[int, dict[str, Any]]:
    r = c.get("/healthz")
    return r.status_code, r.json()


def test_healthz_checks_database_and_blob_store(h: Harness, tmp_path: Path) -> None:
    dev = h.client(h.enroll("SN-H"))
    adm = h.client(None)
    ok = {"ok": True, "checks": {"database": "ok", "blobs": "ok"}}
    assert _health(adm) == (200, ok) and _health(dev) == (200, ok)

    # The database file is gone (a directory in its place): 503 naming the database.
    db = tmp_path / "otaguard.db"
    h.db.engine.dispose()
    os.rename(db, tmp_path / "moved.db")
    db.mkdir()
    try:
        code, body = _health(adm)
        assert code == 503 and body["checks"] == {"database": "failed", "blobs": "ok"}
        assert _health(dev)[0] == 503
    finally:
        db.rmdir()
        os.rename(tmp_path / "moved.db", db)
    assert _health(adm) == (200, ok)

    # The blob store cannot take a file: 503 naming the blob store.
    spool = tmp_path / "blobs" / "tmp"
    shutil.rmtree(spool)
    spool.write_bytes(b"not a directory")
    try:
        code, body = _health(adm)
        assert code == 503 and body["checks"] == {"database": "ok", "blobs": "failed"}
    finally:
        spool.unlink()
        spool.mkdir()
    assert _health(dev) == (200, ok)


# --- metrics ------------------------------------------------------------------------------------
def _scrape(c: httpx.Client) -> dict[str, float]:
    r = c.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return parse_samples(r.text)


def _delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {
        k: v - before.get(k, 0.0)
        for k, v in after.items()
        if v != before.get(k, 0.0)
        and not k.startswith("otaguard_request_duration_seconds")
        and "_created" not in k
    }


def test_metrics_need_a_token_and_count_exactly(h: Harness) -> None:
    anon = h.client(None)
    r = anon.get("/metrics")
    assert r.status_code == 401 and r.json()["error"] == "E_AUTH"
    viewer = admin(h, "viewer")
    before = _scrape(viewer)

    a, b = h.enroll("SN-M1"), h.enroll("SN-M2")
    ca, cb = h.client(a), h.client(b)
    for _ in range(3):
        assert ca.post("/v1/checkin", json={"version": "1.0.0", "keylist_version": 4}).is_success
    assert cb.post("/v1/checkin", json={"version": "1.0.0"}).is_success
    for rid, state in (("r1", "downloading"), ("r2", "success"), ("r3", "reverted")):
        assert ca.post("/v1/reports", json={"report_id": rid, "state": state}).status_code == 201
    assert ca.post("/v1/reports", json={"report_id": "r2", "state": "success"}).status_code == 200
    r = ca.post("/v1/checkin", json={})
    assert r.status_code == 400 and r.json()["error"] == "E_MALFORMED"
    assert ca.get("/v1/images/" + "ab" * 32).status_code == 404  # not offered: a probe
    bad = h.client(None, headers={"Authorization": "Bearer otg_not-a-token"})
    for c in (anon, bad):
        assert c.get("/admin/v1/campaigns").status_code == 401

    after = _scrape(viewer)
    delta = _delta(after, before)
    assert delta == {
        "otaguard_checkins_total": 4.0,
        'otaguard_reports_total{outcome="progress"}': 1.0,
        'otaguard_reports_total{outcome="success"}': 1.0,
        'otaguard_reports_total{outcome="reverted"}': 1.0,
        'otaguard_refusals_total{code="E_MALFORMED",listener="device"}': 1.0,
        'otaguard_refusals_total{code="E_NOT_FOUND",listener="device"}': 1.0,
        'otaguard_refusals_total{code="E_AUTH",listener="admin"}': 2.0,
        'otaguard_probe_events_total{kind="not_offered"}': 1.0,
        'otaguard_auth_failures_total{listener="admin",reason="no_token"}': 1.0,
        'otaguard_auth_failures_total{listener="admin",reason="bad_token"}': 1.0,
        'otaguard_devices_by_keylist_version{version="4"}': 1.0,
        'otaguard_devices_by_keylist_version{version="none"}': 1.0,
    }, delta
    hist = 'otaguard_request_duration_seconds_count{listener="device",method="POST",'
    assert after[hist + 'route="/v1/checkin"}'] == 5.0
    assert after[hist + 'route="/v1/reports"}'] == 4.0
    assert after["otaguard_metrics_database_up"] == 1.0
    # Route templates, never raw paths (bounded cardinality).
    assert not any("ababab" in k for k in after)
    assert any('route="/v1/images/{digest}"' in k for k in after)


def test_metrics_campaign_and_rotation_progress(h: Harness) -> None:
    devs = [h.enroll(f"SN-C{i}") for i in range(4)]
    for i, e in enumerate(devs):
        kl = 7 if i < 3 else 6
        assert h.client(e).post("/v1/checkin", json={"version": "1.0.0", "keylist_version": kl})
    rid = publish(h, "1.1.0", os.urandom(2048))
    op = admin(h, "operator")
    spec = {
        "id": "autumn",
        "release_id": rid,
        "selector": {"model": "gw"},
        "phases": [{"fraction": 1.0}],
        "success_threshold": 1.0,
    }
    r = op.post("/admin/v1/campaigns", json=spec)
    assert r.status_code == 201, r.text
    got = _scrape(admin(h, "viewer"))
    assert got['otaguard_campaigns{status="draft"}'] == 1.0
    assert got['otaguard_campaign_members{campaign="autumn",state="pending",status="draft"}'] == 0
    assert op.post("/admin/v1/campaigns/autumn/start").status_code == 200
    got = _scrape(admin(h, "viewer"))
    key = 'otaguard_campaign_members{campaign="autumn",state="%s",status="running"}'
    assert got[key % "pending"] == 4.0 and got[key % "succeeded"] == 0.0
    assert not any(k.startswith("otaguard_rotation_") for k in got)

    # A rotation in progress (the row the rotation API writes): fraction on its lists.
    with h.db.write() as conn:
        conn.execute(
            models.rotations.insert().values(
                state="started",
                old_kid="aa",
                new_kid="bb",
                start_version=7,
                threshold=900,
                unreachable_after=86400,
                started_at=store.now_s(),
            )
        )
    got = _scrape(admin(h, "viewer"))
    labels = '{rotation="1",state="started"}'
    assert got["otaguard_rotation_targeted_devices" + labels] == 4.0
    assert got["otaguard_rotation_on_new_list_fraction" + labels] == 0.75
    assert got["otaguard_rotation_threshold_fraction" + labels] == 0.9
    assert got['otaguard_devices_by_keylist_version{version="7"}'] == 3.0


def test_each_server_has_its_own_registry(h: Harness) -> None:
    """Two servers in one process never see each other's counts."""
    from otaguard.server.metrics import ServerMetrics

    other = ServerMetrics(h.db)
    h.client(h.enroll("SN-R")).post("/v1/checkin", json={"version": "1.0.0"})
    assert parse_samples(h.srv.metrics.render().decode())["otaguard_checkins_total"] == 1.0
    assert parse_samples(other.render().decode())["otaguard_checkins_total"] == 0.0


# --- systemd units ------------------------------------------------------------------------------
def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = require_binary("systemd-analyze")
    otaguard = shutil.which("otaguard", path=str(Path(sys.executable).parent))
    assert otaguard is not None
    for unit in UNITS:
        (tmp_path / unit.name).write_text(unit.read_text().replace("/usr/bin/otaguard", otaguard))
    proc = subprocess.run(
        [tool, "verify", "--man=no", *(f"./{u.name}" for u in UNITS)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def test_units_are_hardened_and_not_notify() -> None:
    """The processes never send READY=1, so the units must not claim Type=notify."""
    for unit in UNITS:
        text = unit.read_text()
        for line in (
            "DynamicUser=yes",
            "ProtectSystem=strict",
            "NoNewPrivileges=yes",
            "PrivateTmp=yes",
            "ProtectHome=yes",
            "CapabilityBoundingSet=",
            "SystemCallFilter=@system-service",
        ):
            assert re.search(rf"^{re.escape(line)}", text, re.M), (unit.name, line)
        assert "Type=notify" not in text
        assert re.search(r"^StateDirectory=\S+", text, re.M), unit.name
    server = UNITS[0].read_text()
    assert "--config /etc/otaguard/server.toml" in server
    signing = UNITS[1].read_text()
    assert "EnvironmentFile=/etc/otaguard/signing.env" in signing
    assert not re.search(r"^Environment=.*PIN", signing, re.M)  # the PIN is never in the unit
