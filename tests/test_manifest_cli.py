"""``otaguard manifest show|verify`` through the real entry point (exit codes and output)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from otaguard.cli.main import main
from otaguard.crypto.algorithms import HashAlg
from otaguard.crypto.software import SoftwareSigner, generate_private_key
from otaguard.manifest.build import build_envelope, build_unsigned
from otaguard.manifest.ids import class_id, vendor_id
from otaguard.manifest.model import ManifestInfo
from tests.support import missing

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "suit-vectors"
VENDOR = vendor_id("acme.example")
CLASS = class_id(VENDOR, "sensor", "r2")
T0 = 1_800_000_000
INFO = ManifestInfo(
    sequence_number=5,
    vendor_id=VENDOR,
    class_id=CLASS,
    digest_alg=HashAlg.SHA256,
    image_digest=hashlib.sha256(b"fw").digest(),
    image_size=4096,
    version="1.0.1",
    min_version=None,
    security_counter=1,
    expires=None,
    uri="https://updates.acme.example/fw.bin",
    text={"model": "sensor", "hw_rev": "r2"},
)


@pytest.fixture(scope="module")
def ed() -> SoftwareSigner:
    return SoftwareSigner(generate_private_key("ed25519"))


@pytest.fixture
def files(tmp_path: Path, ed: SoftwareSigner) -> dict[str, Path]:
    env = build_envelope(INFO, [ed])
    out = {
        "env": tmp_path / "m.suit",
        "hex": tmp_path / "m.hex",
        "pub": tmp_path / "k.pem",
        "other": tmp_path / "o.pem",
        "unsigned": tmp_path / "u.suit",
    }
    out["env"].write_bytes(env)
    h = env.hex().upper()
    out["hex"].write_text("\n".join(h[i : i + 50] for i in range(0, len(h), 50)) + "\n")
    out["pub"].write_bytes(ed.public_key.to_pem())
    other = SoftwareSigner(generate_private_key("p256"))
    out["other"].write_bytes(other.public_key.to_pem())
    out["unsigned"].write_bytes(build_unsigned(INFO))
    return out


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["manifest", *args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def test_verify_valid_json(capsys: pytest.CaptureFixture[str], files: dict[str, Path]) -> None:
    rc, out, _ = run(capsys, "verify", str(files["env"]), "--key", str(files["pub"]), "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["valid"] is True
    assert doc["version"] == "1.0.1" and doc["vendor_id"] == str(VENDOR)
    assert doc["class_id"] == str(CLASS) and doc["image_size"] == 4096
    assert doc["text"] == {"model": "sensor", "hw_rev": "r2"}
    assert len(doc["signers"]) == 1


def test_verify_hex_input_and_text_output(
    capsys: pytest.CaptureFixture[str], files: dict[str, Path]
) -> None:
    rc, out, _ = run(capsys, "verify", str(files["hex"]), "--hex", "--key", str(files["pub"]))
    assert rc == 0
    assert out.startswith("VALID") and "1.0.1" in out


def test_verify_invalid_exit_1(capsys: pytest.CaptureFixture[str], files: dict[str, Path]) -> None:
    rc, out, _ = run(capsys, "verify", str(files["env"]), "--key", str(files["other"]), "--json")
    assert rc == 1
    doc = json.loads(out)
    assert doc == {"valid": False, "error": "E_UNTRUSTED_KEY", "detail": doc["detail"]}
    data = bytearray(files["env"].read_bytes())
    data[-70] ^= 0x01  # inside the manifest → digest mismatch
    files["env"].write_bytes(bytes(data))
    rc, out, _ = run(capsys, "verify", str(files["env"]), "--key", str(files["pub"]), "--json")
    assert rc == 1 and json.loads(out)["error"] == "E_DIGEST"
    rc, out, _ = run(capsys, "verify", str(files["unsigned"]), "--key", str(files["pub"]))
    assert rc == 1 and out.startswith("INVALID: E_NO_AUTH")


def test_verify_bad_hex(capsys: pytest.CaptureFixture[str], files: dict[str, Path]) -> None:
    files["hex"].write_text("zz")
    rc, out, _ = run(
        capsys, "verify", str(files["hex"]), "--hex", "--key", str(files["pub"]), "--json"
    )
    assert rc == 1 and json.loads(out)["error"] == "E_MALFORMED"


def test_verify_usage_errors(capsys: pytest.CaptureFixture[str], files: dict[str, Path]) -> None:
    rc, _, err = run(capsys, "verify", str(files["env"]))
    assert rc == 2 and "E_USAGE" in err
    rc, _, _ = run(
        capsys,
        "verify",
        str(files["env"]),
        "--key",
        str(files["pub"]),
        "--trust",
        str(files["pub"]),
    )
    assert rc == 2
    rc, _, _ = run(capsys, "verify", str(files["env"]), "--bogus")
    assert rc == 2


def test_verify_threshold(capsys: pytest.CaptureFixture[str], files: dict[str, Path]) -> None:
    rc, out, _ = run(
        capsys,
        "verify",
        str(files["env"]),
        "--key",
        str(files["pub"]),
        "--key",
        str(files["other"]),
        "--threshold",
        "2",
        "--json",
    )
    assert rc == 1 and json.loads(out)["error"] == "E_THRESHOLD"


def test_show_marks_unverified(capsys: pytest.CaptureFixture[str], files: dict[str, Path]) -> None:
    rc, out, _ = run(capsys, "show", str(files["env"]))
    assert rc == 0
    assert out.startswith("*** UNVERIFIED")
    assert "https://updates.acme.example/fw.bin" in out
    rc, out, _ = run(capsys, "show", str(files["hex"]), "--hex", "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["UNVERIFIED"].startswith("UNVERIFIED")
    assert doc["otaguard_profile"]["version"] == "1.0.1"


def test_show_garbage_is_exit_1(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\xd8\x6b\xa1")
    rc, _, err = run(capsys, "show", str(bad))
    assert rc == 1 and "E_MALFORMED" in err


def test_draft_example_via_cli(capsys: pytest.CaptureFixture[str]) -> None:
    if not VECTORS.is_dir():
        missing(f"SUIT vectors ({VECTORS})")  # a failure under CI=true, a skip elsewhere
    ex = str(VECTORS / "manifest" / "example2.signed.hex")
    key = str(VECTORS / "keys" / "example-p256-public.pem")
    rc, out, _ = run(capsys, "show", ex, "--hex")
    assert rc == 0 and "UNVERIFIED" in out
    rc, out, _ = run(capsys, "verify", ex, "--hex", "--key", key, "--any-profile", "--json")
    assert rc == 0
    doc = json.loads(out)
    assert doc["valid"] is True and doc["severed"] == [20, 23]
    rc, out, _ = run(capsys, "verify", ex, "--hex", "--key", key, "--json")
    assert rc == 1 and json.loads(out)["error"] == "E_UNSUPPORTED"


def test_verify_with_trust_bundle(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, ed: SoftwareSigner
) -> None:
    from otaguard.trust.bundle import TrustBundle
    from otaguard.trust.documents import issue_authorization, sign_keylist
    from otaguard.trust.model import Role, Scope

    root = SoftwareSigner(generate_private_key("ed25519"))
    auth = issue_authorization(
        root,
        ed.public_key,
        roles=frozenset({Role.FIRMWARE}),
        scopes=[Scope(VENDOR, frozenset({CLASS}))],
        not_before=T0 - 10,
        not_after=T0 + 86400 * 300,
        name="release",
    )
    keylist = sign_keylist(root, version=1, authorizations=[auth], issued_at=T0)
    bundle = tmp_path / "trust.bundle"
    bundle.write_bytes(TrustBundle(root.public_key, keylist).to_bytes())
    env = tmp_path / "m.suit"
    env.write_bytes(build_envelope(INFO, [ed]))
    rc, out, _ = run(capsys, "verify", str(env), "--trust", str(bundle), "--now", str(T0), "--json")
    assert rc == 0 and json.loads(out)["valid"] is True
    # out of scope: a manifest for another class
    from dataclasses import replace

    env.write_bytes(build_envelope(replace(INFO, class_id=class_id(VENDOR, "x", "1")), [ed]))
    rc, out, _ = run(capsys, "verify", str(env), "--trust", str(bundle), "--now", str(T0), "--json")
    assert rc == 1 and json.loads(out)["error"] == "E_KEY_SCOPE"
    # key expired at that time
    rc, out, _ = run(
        capsys, "verify", str(env), "--trust", str(bundle), "--now", str(T0 + 86400 * 400), "--json"
    )
    assert rc == 1 and json.loads(out)["error"] == "E_KEY_EXPIRED"


def test_verify_refuses_an_expired_manifest(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, ed: SoftwareSigner
) -> None:
    """Regression: an expired manifest printed VALID without a word. Its signatures hold, but
    no device installs it: INVALID E_EXPIRED, judged as devices judge it (expired only after
    its use-before second)."""
    from dataclasses import replace

    env = tmp_path / "m.suit"
    pub = tmp_path / "k.pem"
    pub.write_bytes(ed.public_key.to_pem())
    env.write_bytes(build_envelope(replace(INFO, expires=T0), [ed]))
    rc, out, _ = run(capsys, "verify", str(env), "--key", str(pub), "--now", str(T0 + 1), "--json")
    doc = json.loads(out)
    assert rc == 1 and doc["valid"] is False and doc["error"] == "E_EXPIRED"
    assert "signatures verified" in doc["detail"]
    rc, out, _ = run(capsys, "verify", str(env), "--key", str(pub), "--now", str(T0 + 1))
    assert rc == 1 and out.startswith("INVALID: E_EXPIRED")
    rc, out, _ = run(capsys, "verify", str(env), "--key", str(pub), "--now", str(T0), "--json")
    assert rc == 0 and json.loads(out)["valid"] is True
