"""The key ceremony against a real SoftHSM2 token: keys are generated and used in the token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from otaguard.cli.main import main
from otaguard.errors import ErrorCode
from otaguard.trust import TrustBundle

from .conftest import SoftHsmToken


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_ceremony_in_token(
    softhsm_token: SoftHsmToken,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t = softhsm_token
    monkeypatch.setenv("OTAGUARD_PKCS11_PIN", t.pin)
    root_uri, op_uri = t.uri("root"), t.uri("release-1")
    code, out, err = run(
        capsys,
        "keys",
        "init-root",
        "--pkcs11-uri",
        root_uri,
        "--out-public",
        str(tmp_path / "root.pub"),
        "--json",
    )
    assert code == 0, err
    assert "pin" not in out.lower()
    assert (
        run(
            capsys,
            "keys",
            "generate",
            "--kind",
            "p256",
            "--pkcs11-uri",
            op_uri,
            "--out-public",
            str(tmp_path / "op.pub"),
        )[0]
        == 0
    )
    code, out, err = run(
        capsys,
        "keys",
        "authorize",
        "--pkcs11-uri",
        root_uri,
        "--public-key",
        str(tmp_path / "op.pub"),
        "--vendor",
        "v.example",
        "--keylist",
        str(tmp_path / "kl.cose"),
        "--json",
    )
    assert code == 0, err
    assert (
        run(
            capsys,
            "keys",
            "export-trust",
            "--root-public",
            str(tmp_path / "root.pub"),
            "--keylist",
            str(tmp_path / "kl.cose"),
            "--out",
            str(tmp_path / "b"),
        )[0]
        == 0
    )
    bundle = TrustBundle.load((tmp_path / "b").read_bytes())
    # The root is an Ed25519 key living in the token; its public half verifies the key list.
    assert isinstance(bundle.root.crypto_key, ed25519.Ed25519PublicKey)
    assert bundle.store().keylist.authorizations[0].trusted.key.kind == "p256"
    # Generating over an existing object is refused, never silently replaced.
    code, _, err = run(
        capsys,
        "keys",
        "generate",
        "--pkcs11-uri",
        op_uri,
        "--out-public",
        str(tmp_path / "op2.pub"),
    )
    assert code == 1 and ErrorCode.EXISTS.value in err


def test_wrong_pin_and_missing_object(
    softhsm_token: SoftHsmToken,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    t = softhsm_token
    monkeypatch.setenv("OTAGUARD_PKCS11_PIN", t.pin)
    monkeypatch.setenv("OTAGUARD_KEY_PASSPHRASE", "development only")
    run(
        capsys,
        "keys",
        "init-root",
        "--pkcs11-uri",
        t.uri("root"),
        "--out-public",
        str(tmp_path / "root.pub"),
    )
    run(
        capsys,
        "keys",
        "generate",
        "--key-file",
        str(tmp_path / "op.key"),
        "--out-public",
        str(tmp_path / "op.pub"),
    )
    base = [
        "keys",
        "authorize",
        "--public-key",
        str(tmp_path / "op.pub"),
        "--vendor",
        "v.example",
        "--keylist",
        str(tmp_path / "kl.cose"),
    ]
    code, _, err = run(capsys, *base, "--pkcs11-uri", t.uri("no-such-key"))
    assert code == 1 and ErrorCode.KEY_NOT_FOUND.value in err
    monkeypatch.setenv("OTAGUARD_PKCS11_PIN", "0000wrong")
    code, _, err = run(capsys, *base, "--pkcs11-uri", t.uri("root"))
    assert code == 1 and ErrorCode.PIN.value in err and "0000wrong" not in err
    assert not (tmp_path / "kl.cose").exists()
    code, _, err = run(capsys, *base, "--pkcs11-uri", "pkcs11:token=absent-token;object=root")
    assert code == 1 and ErrorCode.TOKEN_NOT_FOUND.value in err
    code, _, err = run(capsys, *base, "--pkcs11-uri", t.uri("root") + "?pin-value=1234")
    assert code == 2 and ErrorCode.USAGE.value in err
    json.dumps(err)  # one line of plain text, no trace
    assert "Traceback" not in err
