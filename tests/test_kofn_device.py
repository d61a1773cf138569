"""Two-person rule (k-of-n) end to end through the CLI: key list with threshold 2, releases
signed by two keys, and a simulated device that installs only what two distinct keys signed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cbor2
import pytest

from otaguard.cli.main import main
from otaguard.crypto.software import SoftwareSigner
from otaguard.device.lab import image_bytes
from otaguard.manifest.build import build_envelope
from otaguard.manifest.verify import decode_pinned

from .conftest import SoftHsmToken

PASS = "correct horse battery"
VENDOR, MODEL, HW = "hvac.example.com", "ctl-9", "rev-b"


def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def ok(capsys: pytest.CaptureFixture[str], *args: str | Path) -> dict[str, Any]:
    rc, out, err = run(capsys, *args, "--json")
    assert rc == 0, err
    data: dict[str, Any] = json.loads(out)
    return data


def code(err: str) -> str:
    return err.strip().splitlines()[-1].split("error ", 1)[1].split(":", 1)[0]


def n_signatures(envelope: bytes) -> int:
    auth = cbor2.loads(cbor2.loads(envelope).value[2])
    return len(auth) - 1


@pytest.fixture
def d(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("OTAGUARD_KEY_PASSPHRASE", PASS)
    return tmp_path


def ceremony(capsys: pytest.CaptureFixture[str], d: Path) -> None:
    """Root + officer keys A, B (authorized) and C (not), then threshold 2 on the existing list."""
    ok(capsys, "keys", "init-root", "--key-file", d / "root.key", "--out-public", d / "root.pub")
    for name in ("a", "b", "c"):
        ok(capsys, "keys", "generate", "--key-file", d / f"{name}.key",
           "--out-public", d / f"{name}.pub")  # fmt: skip
    kl = d / "keylist.cose"
    root = ("--key-file", d / "root.key")
    for name in ("a", "b"):
        r = ok(capsys, "keys", "authorize", *root, "--public-key", d / f"{name}.pub",
               "--vendor", VENDOR, "--keylist", kl, "--name", f"officer-{name}")  # fmt: skip
    assert r["keylist_version"] == 2
    # the list already holds both keys: authorize --threshold changes only the threshold
    rc, _, err = run(capsys, "keys", "authorize", *root, "--public-key", d / "a.pub",
                     "--vendor", VENDOR, "--keylist", kl)  # fmt: skip
    assert rc == 1 and code(err) == "E_EXISTS"
    r = ok(capsys, "keys", "authorize", *root, "--public-key", d / "a.pub",
           "--keylist", kl, "--threshold", "2")  # fmt: skip
    assert (r["keylist_version"], r["threshold"], r["previous_threshold"]) == (3, 2, 1)
    rc, _, err = run(capsys, "keys", "authorize", *root, "--keylist", kl, "--threshold", "2")
    assert rc == 2 and code(err) == "E_USAGE"  # nothing to change
    rc, _, err = run(capsys, "keys", "authorize", *root, "--keylist", kl, "--threshold", "3")
    assert rc == 1 and code(err) == "E_THRESHOLD"  # more than the list's 2 keys
    shown = ok(capsys, "keys", "list", "--keylist", kl, "--root-public", d / "root.pub")
    assert (shown["version"], shown["threshold"], len(shown["keys"])) == (3, 2, 2)
    ok(capsys, "keys", "export-trust", "--root-public", d / "root.pub", "--keylist", kl,
       "--out", d / "trust.bundle")  # fmt: skip


def release(
    capsys: pytest.CaptureFixture[str],
    d: Path,
    image: Path,
    out: Path,
    version: str,
    *signers: str | Path,
    audit: str = "audit.log",
    extra: tuple[str | Path, ...] = (),
) -> tuple[int, str, str]:
    return run(
        capsys, "release", "create", "--image", image, "--vendor", VENDOR, "--model", MODEL,
        "--hw-rev", HW, "--version", version, "--security-counter", "1", "--expires", "+30d",
        *signers, "--audit-log", d / audit, "--out", out, "--json", *extra,
    )  # fmt: skip


def test_device_with_threshold_2_installs_cosigned_and_refuses_single_signed(
    d: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ceremony(capsys, d)
    two = ("--key-file", d / "a.key", "--key-file", d / "b.key")
    v1, v2 = image_bytes(60_000, 1), bytearray(image_bytes(60_000, 1))
    v2[1000:1100] = image_bytes(100, 2)
    (d / "v1.bin").write_bytes(v1)
    (d / "v2.bin").write_bytes(bytes(v2))

    rc, out, err = release(capsys, d, d / "v1.bin", d / "rel1", "1.0.0", *two)
    assert rc == 0, err
    s1 = json.loads(out)
    assert len(s1["signer_key_ids"]) == 2
    manifest1 = (d / "rel1" / "manifest.suit").read_bytes()
    assert n_signatures(manifest1) == 2

    dev = d / "dev"
    rc, _, err = run(
        capsys, "device", "init", "--dir", dev, "--trust", d / "trust.bundle", "--vendor", VENDOR,
        "--model", MODEL, "--hw-rev", HW, "--version", "1.0.0",
        "--factory-image", d / "rel1" / "image.bin",
        "--factory-manifest", d / "rel1" / "manifest.suit",
        "--slot-size", str(128 * 1024),
    )  # fmt: skip
    assert rc == 0, err

    def install(manifest: Path, *payload: str | Path) -> tuple[int, str, str]:
        return run(capsys, "device", "install", "--dir", dev, "--manifest", manifest, *payload,
                   "--json")  # fmt: skip

    # single-signed with an authorized key (its own audit log: a lone officer)
    rc, _, err = release(capsys, d, d / "v2.bin", d / "single", "1.1.0",
                         "--key-file", d / "a.key", audit="lone.log")  # fmt: skip
    assert rc == 0, err
    rc, _, err = install(d / "single" / "manifest.suit", "--image", d / "single" / "image.bin")
    assert rc == 1 and code(err) == "E_THRESHOLD", err

    # the same key twice: refused by release create, and a forged twice-signed envelope counts 1
    rc, _, err = release(capsys, d, d / "v2.bin", d / "twice", "1.1.0",
                         "--key-file", d / "a.key", "--key-file", d / "a.key")  # fmt: skip
    assert rc == 1 and code(err) == "E_DUPLICATE_SIGNER" and not (d / "twice").exists()
    (d / "a-copy.key").write_bytes((d / "a.key").read_bytes())  # same key, another path
    rc, _, err = release(capsys, d, d / "v2.bin", d / "twice", "1.1.0",
                         "--key-file", d / "a.key", "--key-file", d / "a-copy.key")  # fmt: skip
    assert rc == 1 and code(err) == "E_DUPLICATE_SIGNER" and not (d / "twice").exists()
    a = SoftwareSigner.load(d / "a.key", PASS.encode())
    info = decode_pinned((d / "single" / "manifest.suit").read_bytes()).info
    (d / "twice.suit").write_bytes(build_envelope(info, [a, a]))
    assert n_signatures((d / "twice.suit").read_bytes()) == 2
    rc, _, err = install(d / "twice.suit", "--image", d / "single" / "image.bin")
    assert rc == 1 and code(err) == "E_THRESHOLD", err

    # an authorized key plus one the key list does not hold: still one trusted signature
    rc, _, err = release(capsys, d, d / "v2.bin", d / "ac", "1.1.0", "--key-file", d / "a.key",
                         "--key-file", d / "c.key", audit="ac.log")  # fmt: skip
    assert rc == 0, err
    rc, _, err = install(d / "ac" / "manifest.suit", "--image", d / "ac" / "image.bin")
    assert rc == 1 and code(err) == "E_THRESHOLD", err

    # co-signed by A and B, with a delta from 1.0.0 that carries both signatures too
    rc, out, err = release(capsys, d, d / "v2.bin", d / "rel2", "1.1.0", *two,
                           extra=("--delta-from", d / "rel1"))  # fmt: skip
    assert rc == 0, err
    s2 = json.loads(out)
    assert len(s2["deltas"]) == 1 and len(s2["deltas"][0]["signer_key_ids"]) == 2
    delta = s2["deltas"][0]
    assert n_signatures((d / "rel2" / delta["manifest"]["file"]).read_bytes()) == 2
    rc, out, err = install(d / "rel2" / delta["manifest"]["file"],
                           "--patch", d / "rel2" / delta["patch"])  # fmt: skip
    assert rc == 0, err
    assert json.loads(out)["slot"] == "B"
    rc, out, err = run(capsys, "device", "boot", "--dir", dev, "--json")
    assert rc == 0, err
    assert json.loads(out)["version"] == "1.1.0"

    # every signature is in the audit log: one record per manifest listing both key ids
    rc, out, _ = run(capsys, "audit", "show", d / "audit.log", "--json", "--op", "sign-manifest")
    recs = json.loads(out)["records"]
    assert rc == 0 and len(recs) == 3  # rel1, rel2, rel2's delta
    assert all(sorted(r["subject"]["key_ids"]) == sorted(s1["signer_key_ids"]) for r in recs)


def test_second_pkcs11_uri_is_not_dropped(
    softhsm_token: SoftHsmToken,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Regression: click kept only the last --pkcs11-uri, so a release meant for a threshold-2
    fleet carried one signature and every device refused it."""
    t = softhsm_token
    monkeypatch.setenv("OTAGUARD_PKCS11_PIN", t.pin)
    for name in ("officer-a", "officer-b"):
        ok(capsys, "keys", "generate", "--pkcs11-uri", t.uri(name),
           "--out-public", tmp_path / f"{name}.pub")  # fmt: skip
    img = tmp_path / "fw.bin"
    img.write_bytes(image_bytes(10_000, 3))
    uris = ("--pkcs11-uri", t.uri("officer-a"), "--pkcs11-uri", t.uri("officer-b"))
    rc, out, err = release(capsys, tmp_path, img, tmp_path / "rel", "1.0.0", *uris)
    assert rc == 0, err
    summary = json.loads(out)
    assert len(summary["signer_key_ids"]) == 2
    assert n_signatures((tmp_path / "rel" / "manifest.suit").read_bytes()) == 2
    # the same URI twice is refused before anything is signed
    rc, _, err = release(capsys, tmp_path, img, tmp_path / "rel-dup", "1.0.1",
                         "--pkcs11-uri", t.uri("officer-a"),
                         "--pkcs11-uri", t.uri("officer-a"))  # fmt: skip
    assert rc == 1 and code(err) == "E_DUPLICATE_SIGNER" and not (tmp_path / "rel-dup").exists()
