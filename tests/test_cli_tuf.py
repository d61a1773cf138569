"""``otaguard tuf root`` / ``tuf targets``: the ceremony and the release-key signature, from the
command line, checked as the server checks them (python-tuf verifies what we sign)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tuf.api.metadata import Metadata, Root, Targets

from otaguard.cli.main import main
from otaguard.server.storage.tufrepo import TufRepository
from otaguard.tufrepo import metadata as tm


def run(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def d(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    monkeypatch.setenv("OTAGUARD_KEY_PASSPHRASE", "correct horse battery")
    for name, kind in (("root", "ed25519"), ("root2", "p256"), ("op", "p256")):
        key, pub = tmp_path / f"{name}.key", tmp_path / f"{name}.pub"
        rc, _, err = run(capsys, "keys", "generate", "--kind", kind, "--key-file", key,
                         "--out-public", pub)  # fmt: skip
        assert rc == 0, err
    repo = TufRepository(tmp_path / "server-tuf")
    online = {r: k.to_pem().decode() for r, k in repo.online_keys().items()}
    (tmp_path / "online.json").write_text(json.dumps(online))
    (tmp_path / "image.bin").write_bytes(b"\x42" * 3000)
    return tmp_path


def root_args(d: Path, *extra: object) -> list[object]:
    return ["tuf", "root", "--targets-key", d / "op.pub", "--online-keys", d / "online.json",
            *extra]  # fmt: skip


def test_root_ceremony_rotation_and_targets(d: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = run(capsys, *root_args(d, "--root-key", d / "root.pub", "--key-file",
                                        d / "root.key", "--out", d / "1.root.json"))  # fmt: skip
    assert rc == 0, err
    v1 = tm.check_first_root((d / "1.root.json").read_bytes(), 0)
    assert v1.signed.version == 1 and v1.signed.consistent_snapshot
    # Next version with a new root key: signed by the new key alone it is refused, and
    # nothing is written; signed by old and new it is version 2.
    rc, _, err = run(capsys, *root_args(d, "--root-key", d / "root2.pub", "--previous",
                                        d / "1.root.json", "--key-file", d / "root2.key",
                                        "--out", d / "2.root.json"))  # fmt: skip
    assert rc == 1 and "E_SIGNATURE" in err and not (d / "2.root.json").exists()
    rc, _, err = run(capsys, *root_args(d, "--root-key", d / "root2.pub", "--previous",
                                        d / "1.root.json", "--key-file", d / "root.key",
                                        "--key-file", d / "root2.key", "--out",
                                        d / "2.root.json"))  # fmt: skip
    assert rc == 0, err
    v2 = tm.check_root_update(v1, (d / "2.root.json").read_bytes(), 0)
    assert v2.signed.version == 2

    # A release, then its TUF targets through the same signing state and audit log.
    audit = d / "audit.log"
    common = ["--vendor", "example.com", "--model", "gw", "--hw-rev", "r1",
              "--security-counter", "1", "--key-file", d / "op.key",
              "--audit-log", audit]  # fmt: skip
    rc, _, err = run(capsys, "release", "create", "--image", d / "image.bin", "--version",
                     "1.0.0", "--expires", "+30d", *common, "--out", d / "rel")  # fmt: skip
    assert rc == 0, err
    signing = ["--key-file", d / "op.key", "--audit-log", audit]
    rc, out, err = run(capsys, "tuf", "targets", d / "rel", *signing, "--out",
                       d / "targets.json", "--json")  # fmt: skip
    assert rc == 0, err
    md = Metadata[Targets].from_bytes((d / "targets.json").read_bytes())
    assert json.loads(out)["targets_version"] == md.signed.version
    assert md.signed.targets["gw/r1/image.bin"].length == 3000
    # The server takes it under root v2 (the targets key is named there).
    repo = TufRepository(d / "server-tuf")
    repo.put_root((d / "1.root.json").read_bytes())
    repo.put_root((d / "2.root.json").read_bytes())
    assert repo.put_targets((d / "targets.json").read_bytes(), lambda _: True) > 0
    assert Metadata[Root].from_bytes(repo.metadata_bytes("2.root.json")).signed.version == 2
    # Never overwritten; a tightened policy refuses with a code and writes nothing.
    rc, _, err = run(capsys, "tuf", "targets", d / "rel", *signing, "--out", d / "targets.json")
    assert rc == 1 and "E_EXISTS" in err
    policy = {"version": 1, "requesters": {"ci": [{"vendor": "*"}]}, "max_validity_days": 10}
    (d / "policy.json").write_text(json.dumps(policy))
    rc, _, err = run(capsys, "tuf", "targets", d / "rel", *signing, "--policy", d / "policy.json",
                     "--requester", "ci", "--out", d / "t2.json")  # fmt: skip
    assert rc == 1 and "E_POLICY" in err and not (d / "t2.json").exists()
    # Bad input files: one line with a code.
    (d / "bad.json").write_text("{}")
    rc, _, err = run(capsys, *root_args(d, "--root-key", d / "root.pub", "--key-file",
                                        d / "root.key", "--online-keys", d / "bad.json",
                                        "--out", d / "x.json"))  # fmt: skip
    assert rc == 1 and "E_MALFORMED" in err


def test_targets_through_the_signing_service(
    d: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from otaguard.signing.client import TOKEN_ENV
    from tests.test_signing_http import Service, run_server

    s = Service(d / "svc-state")
    monkeypatch.setenv(TOKEN_ENV, s.tokens["ci"])
    try:
        with run_server(s.app) as url:
            rc, _, err = run(capsys, "release", "create", "--image", d / "image.bin",
                             "--vendor", "example.com", "--model", "thermo", "--hw-rev", "A",
                             "--version", "1.0.0", "--security-counter", "1", "--expires",
                             "+30d", "--signing-url", url, "--out", d / "rel")  # fmt: skip
            assert rc == 0, err
            rc, out, err = run(capsys, "tuf", "targets", d / "rel", "--signing-url", url,
                               "--out", d / "targets.json", "--json")  # fmt: skip
            assert rc == 0, err
            rc, _, err = run(capsys, "tuf", "targets", d / "rel", "--signing-url", url,
                             "--key-file", d / "op.key", "--out", d / "t2.json")  # fmt: skip
            assert rc == 2 and "E_USAGE" in err
    finally:
        s.service.close()
    md = Metadata[Targets].from_bytes((d / "targets.json").read_bytes())
    assert json.loads(out)["targets_version"] == md.signed.version
    assert "thermo/A/image.bin" in md.signed.targets
