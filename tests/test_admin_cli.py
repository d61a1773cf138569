"""The admin CLI against a real admin listener (TLS, bearer tokens): publishing a ``release
create`` directory (idempotent), the fleet views, revocation through the API, and bad input —
a missing server, an unreachable one, a wrong token, an unknown id, a malformed file — each
answered with exactly one ``otaguard: error E_...`` line and exit 1 (2 for usage)."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import contextlib
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from otaguard.adminclient import AdminClient, AdminError
from otaguard.cli.main import main
from otaguard.crypto.keys import PublicKey
from otaguard.errors import ErrorCode
from otaguard.server.context import TrustState
from otaguard.trust.model import StaticKeys
from tests.campaign_fleet import token
from tests.pg import Harness, fleet_ca, harness, server_tls  # noqa: F401

MODEL, HW = "ctl-9", "rev-b"


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, Any, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    try:
        data = json.loads(out) if out.strip().startswith(("{", "[")) else out
    except ValueError:
        data = out
    return code, data, err


def one_error(err: str, code: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"otaguard: error {code}: "), err


@pytest.fixture
def keys_dir(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A development signing key and two releases made with ``release create``: 1.0.0 and
    1.1.0 with a delta from 1.0.0."""
    d = tmp_path_factory.mktemp("rel")
    monkeypatch.setenv("OTAGUARD_KEY_PASSPHRASE", "release-key-passphrase")
    assert main(["keys", "generate", "--key-file", str(d / "op.key"),
                 "--out-public", str(d / "op.pub")]) == 0  # fmt: skip
    old = os.urandom(40_000)
    (d / "fw-1.0.0.bin").write_bytes(old)
    (d / "fw-1.1.0.bin").write_bytes(old[:36_000] + os.urandom(4_000))
    for version, counter, extra in (
        ("1.0.0", "1", []),
        ("1.1.0", "2", ["--delta-from", str(d / "rel-1.0.0")]),
    ):
        argv = [
            "release", "create", "--image", str(d / f"fw-{version}.bin"),
            "--vendor", "hvac.example.com", "--model", MODEL, "--hw-rev", HW,
            "--version", version, "--security-counter", counter, "--expires", "+30d",
            "--key-file", str(d / "op.key"), "--audit-log", str(d / "audit.log"),
            "--out", str(d / f"rel-{version}"), *extra,
        ]  # fmt: skip
        assert main(argv) == 0
    return d


@pytest.fixture
def setup(
    keys_dir: Path,
    fleet_ca: Any,
    server_tls: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> Iterator[tuple[Harness, list[str]]]:
    from otaguard.server.storage.db import sqlite_url

    capsys.readouterr()
    pub = PublicKey.from_pem((keys_dir / "op.pub").read_bytes())
    trust = TrustState(StaticKeys([pub]))
    for var in ("OTAGUARD_SERVER", "OTAGUARD_ADMIN_CA"):
        monkeypatch.delenv(var, raising=False)
    with harness(
        sqlite_url(tmp_path / "db.sqlite"), fleet_ca, server_tls, tmp_path, trust=trust
    ) as h:
        assert h.admin_server is not None
        common = ["--server", h.admin_server.url, "--ca-file", str(server_tls / "ca.pem")]
        monkeypatch.setenv("OTAGUARD_ADMIN_TOKEN", token(h.db, "security-officer"))
        yield h, common


def test_publish_is_idempotent_and_complete(
    setup: tuple[Harness, list[str]], keys_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h, common = setup
    rel = str(keys_dir / "rel-1.1.0")
    code, out, err = run(capsys, "release", "publish", rel, *common, "--json")
    assert code == 0, err
    assert out["created"] and out["version"] == "1.1.0"
    assert [(d["base_version"], d["created"]) for d in out["deltas"]] == [("1.0.0", True)]
    rid = out["release_id"]
    # A re-run (e.g. after a dropped connection) changes nothing and does not fail.
    code, again, err = run(capsys, "release", "publish", rel, *common, "--json")
    assert code == 0, err
    assert again["release_id"] == rid and not again["created"]
    assert [d["created"] for d in again["deltas"]] == [False]
    code, text, err = run(capsys, "release", "publish", rel, *common)
    assert code == 0 and text.startswith(f"already published: release {rid} ")
    code, listed, err = run(capsys, "release", "list", *common, "--json")
    assert code == 0 and [r["id"] for r in listed["releases"]] == [rid]
    code, shown, err = run(capsys, "release", "show", str(rid), *common, "--json")
    assert code == 0 and shown["version"] == "1.1.0"
    summary = json.loads((keys_dir / "rel-1.1.0" / "release.json").read_text())
    assert [d["manifest_digest"] for d in shown["deltas"]] == [
        summary["deltas"][0]["manifest"]["suit_digest"]
    ]
    code, text, err = run(capsys, "release", "show", str(rid), *common)
    assert code == 0 and "delta 1 from 1.0.0" in text
    # The same version signed again (another signing state) is another manifest: a real
    # conflict, refused. Another expiry makes it another manifest for sure: Ed25519 is
    # deterministic and a fresh state's sequence number is the current second, so within the
    # same second as the first, "+30d" again gave identical bytes ("already published").
    other = keys_dir / "rel-1.1.0-again"
    assert main([
        "release", "create", "--image", str(keys_dir / "fw-1.1.0.bin"),
        "--vendor", "hvac.example.com", "--model", MODEL, "--hw-rev", HW,
        "--version", "1.1.0", "--security-counter", "2", "--expires", "+31d",
        "--key-file", str(keys_dir / "op.key"), "--audit-log", str(keys_dir / "audit-2.log"),
        "--out", str(other),
    ]) == 0  # fmt: skip
    capsys.readouterr()
    code, out, err = run(capsys, "release", "publish", str(other), *common)
    assert code == 1
    one_error(err, "E_CONFLICT")
    # A release-manager may publish, a viewer may not.
    os.environ["OTAGUARD_ADMIN_TOKEN"] = token(h.db, "viewer")
    code, out, err = run(capsys, "release", "publish", str(keys_dir / "rel-1.0.0"), *common)
    assert code == 1
    one_error(err, "E_FORBIDDEN")


def test_fleet_views_assign_and_revoke(
    setup: tuple[Harness, list[str]], keys_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    h, common = setup
    for serial in ("SN-A1", "SN-A2"):
        h.enroll(serial, model=MODEL, hw_rev=HW)
    code, out, err = run(capsys, "release", "publish", str(keys_dir / "rel-1.0.0"), *common,
                         "--json")  # fmt: skip
    assert code == 0, err
    rid = out["release_id"]
    code, out, err = run(capsys, "fleet", "set-groups", "SN-A1", "--group", "pilot", *common,
                         "--json")  # fmt: skip
    assert code == 0 and out == {"serial": "SN-A1", "groups": ["pilot"]}
    code, out, err = run(capsys, "fleet", "groups", *common, "--json")
    assert code == 0 and {"name": "pilot", "devices": 1} in out["groups"]
    code, out, err = run(capsys, "fleet", "devices", "--group", "pilot", *common, "--json")
    assert code == 0 and [d["serial"] for d in out["devices"]] == ["SN-A1"]
    code, out, err = run(capsys, "fleet", "devices", "--model", MODEL, *common)
    assert code == 0 and "SN-A1" in out and "SN-A2" in out and "2 of 2 device(s)" in out
    code, out, err = run(capsys, "fleet", "assign", "SN-A2", "--release-id", str(rid), *common,
                         "--json")  # fmt: skip
    assert code == 0 and out == {"serial": "SN-A2", "release_id": rid}
    code, out, err = run(capsys, "fleet", "device", "SN-A2", *common, "--json")
    assert code == 0 and out["serial"] == "SN-A2" and out["last_report"] is None
    assert not out["revoked"] and out["assignment"]["release_id"] == rid
    assert out["assignment"]["state"] == "assigned" and out["assignment"]["campaign_id"] is None
    code, out, err = run(capsys, "fleet", "revoke", "--serial", "SN-A2", *common, "--json")
    assert code == 0 and out == {"serial": "SN-A2", "revoked": True}
    code, out, err = run(capsys, "fleet", "device", "SN-A2", *common)
    assert code == 0 and "REVOKED" in out and "report    none yet" in out
    assert f"assigned  release {rid}: assigned" in out


def test_server_refusals_are_one_line(
    setup: tuple[Harness, list[str]],
    keys_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _h, common = setup
    unknown = [
        (["release", "show", "999"], "E_NOT_FOUND"),
        (["fleet", "device", "NOPE"], "E_NOT_FOUND"),
        (["fleet", "set-groups", "NOPE", "--group", "g"], "E_NOT_FOUND"),
        (["fleet", "assign", "NOPE", "--release-id", "1"], "E_NOT_FOUND"),
        (["fleet", "revoke", "--serial", "NOPE"], "E_NOT_FOUND"),
        (["campaign", "status", "nope"], "E_NOT_FOUND"),
        (["campaign", "start", "nope"], "E_NOT_FOUND"),
    ]
    for argv, code_name in unknown:
        code, _, err = run(capsys, *argv, *common)
        assert code == 1, argv
        one_error(err, code_name)
    code, _, err = run(capsys, "rotation", *common, "status")
    assert code == 1
    one_error(err, "E_NOT_FOUND")
    # Malformed files: caught locally, or refused by the server with its own code.
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"\xa1\x00not a key list")
    bad_rel = tmp_path / "bad-rel"
    bad_rel.mkdir()
    (bad_rel / "release.json").write_text("{not json")
    outside = tmp_path / "outside-rel"
    outside.mkdir()
    (outside / "release.json").write_text(
        json.dumps({"model": MODEL, "hw_rev": HW, "image": {"file": "../op.key"},
                    "manifest": {"file": "m.suit", "suit_digest": "00"}})
    )  # fmt: skip
    bad_spec = tmp_path / "spec.json"
    bad_spec.write_text("[1, 2")
    malformed = [
        (["release", "publish", str(bad_rel)], "E_MALFORMED"),
        (["release", "publish", str(outside)], "E_MALFORMED"),
        (["release", "publish", str(tmp_path)], "E_NOT_FOUND"),  # no release.json
        (["keys", "publish", "--keylist", str(junk)], "E_UNTRUSTED_KEY"),  # no root: refused
        (
            [
                "campaign",
                "create",
                "c1",
                "--release-id",
                "1",
                "--model",
                MODEL,
                "--spec",
                str(bad_spec),
            ],
            "E_MALFORMED",
        ),
    ]
    for argv, code_name in malformed:
        code, _, err = run(capsys, *argv, *common)
        assert code == 1, argv
        one_error(err, code_name)
    code, _, err = run(capsys, "rotation", *common, "start", "--keylist", str(junk),
                         "--old-kid", "0" * 32, "--new-kid", "1" * 32)  # fmt: skip
    assert code == 1
    one_error(err, "E_UNTRUSTED_KEY")


ADMIN_COMMANDS: list[list[str]] = [
    ["release", "list"],
    ["release", "show", "1"],
    ["release", "publish", "{rel}"],
    ["fleet", "devices", "--model", MODEL],
    ["fleet", "device", "SN-1"],
    ["fleet", "groups"],
    ["fleet", "set-groups", "SN-1", "--group", "g"],
    ["fleet", "assign", "SN-1", "--release-id", "1"],
    ["keys", "publish", "--keylist", "{rel}/manifest.suit"],
    ["campaign", "list"],
    ["campaign", "status", "c1"],
    ["campaign", "start", "c1"],
    ["campaign", "create", "c1", "--release-id", "1", "--model", MODEL],
    ["rotation", "status"],
    ["rotation", "advance", "--id", "1"],
    ["rotation", "release-key"],
]


def _argv(cmd: list[str], opts: list[str], rel: Path) -> list[str]:
    cmd = [c.replace("{rel}", str(rel)) for c in cmd]
    if cmd[0] == "rotation":  # --server and --ca-file are options of the group
        return ["rotation", *opts, *cmd[1:]]
    return [*cmd, *opts]


@pytest.mark.parametrize("cmd", ADMIN_COMMANDS, ids=" ".join)
def test_missing_server_unreachable_server_no_token(
    cmd: list[str],
    keys_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rel = keys_dir / "rel-1.0.0"
    for var in ("OTAGUARD_SERVER", "OTAGUARD_ADMIN_CA"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OTAGUARD_ADMIN_TOKEN", "some-token")
    capsys.readouterr()
    code, _, err = run(capsys, *_argv(cmd, [], rel))
    assert code == 2
    one_error(err, "E_USAGE")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, _, err = run(capsys, *_argv(cmd, ["--server", f"https://127.0.0.1:{port}"], rel))
    assert code == 1
    one_error(err, "E_TRANSPORT")
    code, _, err = run(capsys, *_argv(cmd, ["--server", "ftp://example"], rel))
    assert code == 2
    one_error(err, "E_USAGE")
    monkeypatch.delenv("OTAGUARD_ADMIN_TOKEN")
    code, _, err = run(capsys, *_argv(cmd, ["--server", f"https://127.0.0.1:{port}"], rel))
    assert code == 1
    one_error(err, "E_AUTH")


@pytest.mark.parametrize("cmd", ADMIN_COMMANDS, ids=" ".join)
def test_wrong_token(
    cmd: list[str],
    setup: tuple[Harness, list[str]],
    keys_dir: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _h, common = setup
    monkeypatch.setenv("OTAGUARD_ADMIN_TOKEN", "not-a-token-the-server-issued")
    code, _, err = run(capsys, *_argv(cmd, common, keys_dir / "rel-1.0.0"))
    assert code == 1
    one_error(err, "E_AUTH")


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (
        ["release", "show", "not-a-number"],
        ["fleet", "assign", "SN-1"],  # --release-id missing
        ["fleet", "devices", "--limit", "0"],
        ["release", "list", "--no-such-option"],
        ["no-such-command"],
    ):
        code, _, err = run(capsys, *argv)
        assert code == 2, argv
        one_error(err, "E_USAGE")
    code, _, err = run(capsys, "release")  # a bare group still shows its help
    assert code == 2 and err.startswith("Usage: otaguard release") and "publish" in err


def test_client_typed_errors(setup: tuple[Harness, list[str]], server_tls: Path) -> None:
    """The library itself: refusals as AdminError with the server's code and status."""
    h, _common = setup
    assert h.admin_server is not None
    with AdminClient.connect(h.admin_server.url, ca_file=server_tls / "ca.pem") as c:
        assert c.list_releases() == [] and c.list_groups() == []
        with pytest.raises(AdminError) as ei:
            c.release(7)
        assert ei.value.code == ErrorCode.NOT_FOUND and ei.value.status == 404
        with pytest.raises(AdminError) as ei:
            c.as_token("bogus").list_devices()
        assert ei.value.code == ErrorCode.AUTH and ei.value.status == 401
        h.enroll("SN-C1", model=MODEL, hw_rev=HW)
        assert c.set_groups("SN-C1", ["a"])["groups"] == ["a"]
        dev = c.device("SN-C1")
        assert dev["groups"] == ["a"] and dev["last_report"] is None
        assert c.list_devices(group="a")["total"] == 1


def test_keys_publish(
    fleet_ca: Any,
    server_tls: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A root-signed key list v2 published with `keys publish`; the same list again is a
    replay the server refuses (E_REPLAY) in one line."""
    from otaguard.server.storage.db import sqlite_url
    from otaguard.trust.bundle import TrustBundle

    monkeypatch.setenv("OTAGUARD_KEY_PASSPHRASE", "key-passphrase-for-tests")
    d = tmp_path

    def ok(*argv: str) -> None:
        assert main(list(argv)) == 0

    ok("keys", "init-root", "--key-file", str(d / "root.key"), "--out-public", str(d / "root.pub"))
    for name in ("a", "b"):
        ok("keys", "generate", "--key-file", str(d / f"{name}.key"),
           "--out-public", str(d / f"{name}.pub"))  # fmt: skip
    auth = ["keys", "authorize", "--key-file", str(d / "root.key"), "--vendor", "example.com",
            "--keylist", str(d / "kl.cose")]  # fmt: skip
    ok(*auth, "--public-key", str(d / "a.pub"))
    ok("keys", "export-trust", "--root-public", str(d / "root.pub"),
       "--keylist", str(d / "kl.cose"), "--out", str(d / "trust.bundle"))  # fmt: skip
    ok(*auth, "--public-key", str(d / "b.pub"))  # key list v2
    capsys.readouterr()
    trust = TrustState(TrustBundle.load((d / "trust.bundle").read_bytes()).store())
    with harness(sqlite_url(d / "db.sqlite"), fleet_ca, server_tls, d, trust=trust) as h:
        assert h.admin_server is not None
        common = ["--server", h.admin_server.url, "--ca-file", str(server_tls / "ca.pem")]
        monkeypatch.setenv("OTAGUARD_ADMIN_TOKEN", token(h.db, "operator"))
        code, _, err = run(capsys, "keys", "publish", "--keylist", str(d / "kl.cose"), *common)
        assert code == 1
        one_error(err, "E_FORBIDDEN")  # a security officer's job
        monkeypatch.setenv("OTAGUARD_ADMIN_TOKEN", token(h.db, "security-officer"))
        code, out, err = run(capsys, "keys", "publish", "--keylist", str(d / "kl.cose"), *common,
                             "--json")  # fmt: skip
        assert code == 0 and out == {"version": 2}, err
        code, _, err = run(capsys, "keys", "publish", "--keylist", str(d / "kl.cose"), *common)
        assert code == 1
        one_error(err, "E_REPLAY")


def test_device_sync_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not a certificate\n")
    base = ["device", "sync", "--server", "https://127.0.0.1:9", "--ca", str(ca)]
    code, _, err = run(capsys, *base, "--dir", str(tmp_path / "no-device"))
    assert code == 1
    one_error(err, "E_NOT_FOUND")
    code, _, err = run(capsys, *base, "--dir", str(tmp_path), "--cert", str(ca))
    assert code == 2
    one_error(err, "E_USAGE")
    code, _, err = run(capsys, "device", "sync", "--dir", str(tmp_path))
    assert code == 2
    one_error(err, "E_USAGE")


def test_client_covers_every_admin_route() -> None:
    """One method per admin endpoint: every route of the admin app is called by some
    AdminClient method (a new endpoint without a client method fails here)."""
    import re
    import types

    import httpx

    from otaguard.server.admin_api.routes import admin_routes
    from otaguard.server.admin_api.tuf import admin_tuf_routes

    fake: Any = types.SimpleNamespace(campaigns=None)
    routes = {
        (m, re.sub(r"\{[^}]+\}", "{}", r.path))
        for r in [*admin_routes(fake), *admin_tuf_routes(fake)]
        for m in (r.methods or set()) - {"HEAD"}
    }
    patterns = {
        (m, re.compile("^" + re.escape(p).replace(r"\{\}", "[^/]+") + "$")): (m, p)
        for m, p in routes
    }
    seen: set[tuple[str, str]] = set()

    def handler(request: httpx.Request) -> httpx.Response:
        hits = [
            key
            for (m, rx), key in patterns.items()
            if m == request.method and rx.match(request.url.path)
        ]
        if not hits:  # a method for a route this build does not serve (optional features)
            return httpx.Response(404, json={"error": "E_NOT_FOUND", "detail": "no route"})
        # the most specific template (fewest placeholders) is the route Starlette picks
        seen.add(min(hits, key=lambda k: k[1].count("{}")))
        body = {"releases": [], "groups": [], "campaigns": [], "deltas": [], "id": 1}
        return httpx.Response(200, json=body)

    c = AdminClient(
        httpx.Client(base_url="https://admin.test", transport=httpx.MockTransport(handler))
    )
    c.upload_blob(b"x"), c.create_release(b"e", "b"), c.create_delta(1, b"e", "p")
    c.list_releases(), c.release(1), c.release_key(), c.list_devices(), c.device("s")
    c.device_campaigns("s"), c.set_groups("s", []), c.list_groups(), c.assign("s", 1)
    c.revoke_device("s"), c.put_keylist(b"k"), c.rotation(), c.rotation(1), c.key_expiry()
    c.start_rotation(b"k", old_kid="a", new_kid="b"), c.advance_rotation(1)
    c.finish_rotation(1, b"k"), c.create_campaign({}), c.campaign_action("c", "start")
    c.campaign("c"), c.list_campaigns(), c.openapi()
    c.attach_mcuboot(1, "b"), c.set_class_format("c", "mcuboot")
    c.tuf_online_keys(), c.put_tuf_root(b"{}"), c.put_tuf_targets(b"{}")
    with contextlib.suppress(AdminError):
        c.expiring_certificates()
    assert seen == routes


def test_publish_attaches_the_mcuboot_image_and_a_class_switches_format(
    setup: tuple[Harness, list[str]], keys_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A release directory with an MCUboot image: publish attaches it (a re-run says so and
    changes nothing); fleet set-class-format makes the class's devices get it."""
    from otaguard.manifest.ids import class_id, vendor_id
    from otaguard.server.storage.mcuboot import class_format

    h, common = setup
    rel = keys_dir / "rel-2.0.0-mcu"
    assert main([
        "release", "create", "--image", str(keys_dir / "fw-1.1.0.bin"),
        "--vendor", "hvac.example.com", "--model", MODEL, "--hw-rev", HW,
        "--version", "2.0.0", "--security-counter", "3", "--expires", "+30d",
        "--key-file", str(keys_dir / "op.key"), "--audit-log", str(keys_dir / "audit.log"),
        "--format", "mcuboot", "--out", str(rel),
    ]) == 0  # fmt: skip
    capsys.readouterr()
    code, out, err = run(capsys, "release", "publish", str(rel), *common, "--json")
    assert code == 0 and out["mcuboot"] == "attached", err
    code, out, err = run(capsys, "release", "publish", str(rel), *common, "--json")
    assert code == 0 and out["mcuboot"] == "already attached" and not out["created"], err
    args = ["--vendor", "hvac.example.com", "--model", MODEL, "--hw-rev", HW]
    code, out, err = run(capsys, "fleet", "set-class-format", *args, "--format", "mcuboot",
                         *common, "--json")  # fmt: skip
    cid = str(class_id(vendor_id("hvac.example.com"), MODEL, HW))
    assert code == 0 and out == {"class_id": cid, "format": "mcuboot"}, err
    with h.db.read() as conn:
        assert class_format(conn, cid) == "mcuboot"
    code, _, err = run(capsys, "fleet", "set-class-format", *args, "--format", "tuf", *common)
    assert code == 2 and "E_USAGE" in err
