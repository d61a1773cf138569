"""`otaguard keys` end to end with development key files (PKCS#11 paths: test_cli_keys_hsm)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from otaguard.cli.main import main
from otaguard.errors import ErrorCode
from otaguard.trust import TrustBundle


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("OTAGUARD_KEY_PASSPHRASE", "correct horse battery")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def list_keylist(capsys: pytest.CaptureFixture[str], d: Path, *extra: str) -> tuple[int, str, str]:
    """`keys list` of the ceremony's key list, verified against its root."""
    return run(
        capsys,
        "keys",
        "list",
        "--keylist",
        str(d / "keylist.cose"),
        "--root-public",
        str(d / "root.pub"),
        *extra,
    )


def ceremony(capsys: pytest.CaptureFixture[str], d: Path) -> None:
    assert (
        run(
            capsys,
            "keys",
            "init-root",
            "--key-file",
            str(d / "root.key"),
            "--out-public",
            str(d / "root.pub"),
        )[0]
        == 0
    )
    assert (
        run(
            capsys,
            "keys",
            "generate",
            "--kind",
            "p256",
            "--key-file",
            str(d / "op.key"),
            "--out-public",
            str(d / "op.pub"),
        )[0]
        == 0
    )
    code, out, err = run(
        capsys,
        "keys",
        "authorize",
        "--key-file",
        str(d / "root.key"),
        "--public-key",
        str(d / "op.pub"),
        "--vendor",
        "hvac.example.com",
        "--class",
        "ctl-9:rev-b",
        "--roles",
        "firmware,keylist",
        "--valid-days",
        "365",
        "--name",
        "release-1",
        "--keylist",
        str(d / "keylist.cose"),
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["keylist_version"] == 1


def test_full_ceremony_and_bundle(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ceremony(capsys, env)
    code, out, err = run(
        capsys,
        "keys",
        "export-trust",
        "--root-public",
        str(env / "root.pub"),
        "--keylist",
        str(env / "keylist.cose"),
        "--out",
        str(env / "bundle.cbor"),
        "--json",
    )
    assert code == 0, err
    bundle = TrustBundle.load((env / "bundle.cbor").read_bytes())
    assert bundle.store().version == 1
    code, out, _ = run(capsys, "keys", "list", "--trust", str(env / "bundle.cbor"), "--json")
    listing = json.loads(out)
    assert code == 0
    assert listing["keys"][0]["status"] == "valid"
    assert listing["keys"][0]["roles"] == ["firmware", "keylist"]
    assert (
        "WARNING"
        in run(
            capsys,
            "keys",
            "generate",
            "--key-file",
            str(env / "x.key"),
            "--out-public",
            str(env / "x.pub"),
        )[2]
    )


def test_revoke_bumps_version_and_refuses_to_empty_the_list(
    env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ceremony(capsys, env)
    kid = json.loads(list_keylist(capsys, env, "--json")[1])["keys"][0]["kid"]
    before = (env / "keylist.cose").read_bytes()
    code, _, err = run(
        capsys,
        "keys",
        "revoke",
        "--key-file",
        str(env / "root.key"),
        "--keylist",
        str(env / "keylist.cose"),
        "--kid",
        kid,
    )
    # Revoking the only key would strand every device: refused, file untouched.
    assert code == 1
    assert ErrorCode.EMPTY_KEYLIST.value in err
    assert (env / "keylist.cose").read_bytes() == before
    run(
        capsys,
        "keys",
        "generate",
        "--key-file",
        str(env / "op2.key"),
        "--out-public",
        str(env / "op2.pub"),
    )
    assert (
        run(
            capsys,
            "keys",
            "authorize",
            "--key-file",
            str(env / "root.key"),
            "--public-key",
            str(env / "op2.pub"),
            "--vendor",
            "hvac.example.com",
            "--keylist",
            str(env / "keylist.cose"),
        )[0]
        == 0
    )
    code, out, err = run(
        capsys,
        "keys",
        "revoke",
        "--key-file",
        str(env / "root.key"),
        "--keylist",
        str(env / "keylist.cose"),
        "--kid",
        kid,
        "--json",
    )
    assert code == 0, err
    assert json.loads(out)["keylist_version"] == 3
    listing = json.loads(list_keylist(capsys, env, "--json")[1])
    assert kid in listing["revoked"]
    assert all(k["kid"] != kid for k in listing["keys"])


@pytest.mark.parametrize(
    ("args", "code_expected", "error"),
    [
        (
            [
                "keys",
                "authorize",
                "--public-key",
                "op.pub",
                "--vendor",
                "v.example",
                "--keylist",
                "kl",
            ],
            2,
            ErrorCode.USAGE,
        ),  # no signer given
        (
            [
                "keys",
                "authorize",
                "--key-file",
                "root.key",
                "--public-key",
                "op.pub",
                "--vendor",
                "v.example",
                "--keylist",
                "kl",
                "--roles",
                "admin",
            ],
            2,
            ErrorCode.USAGE,
        ),
        (
            [
                "keys",
                "authorize",
                "--key-file",
                "root.key",
                "--public-key",
                "op.pub",
                "--vendor",
                "v.example",
                "--keylist",
                "kl",
                "--class",
                "nohwrev",
            ],
            2,
            ErrorCode.USAGE,
        ),
        (
            [
                "keys",
                "revoke",
                "--key-file",
                "root.key",
                "--keylist",
                "keylist.cose",
                "--kid",
                "zz",
            ],
            2,
            ErrorCode.USAGE,
        ),
    ],
)
def test_usage_errors(
    env: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    code_expected: int,
    error: ErrorCode,
) -> None:
    ceremony(capsys, env)
    code, _, err = run(capsys, *args)
    assert code == code_expected
    assert error.value in err
    assert "Traceback" not in err


def test_wrong_passphrase_and_tampered_keylist(
    env: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ceremony(capsys, env)
    monkeypatch.setenv("OTAGUARD_KEY_PASSPHRASE", "wrong passphrase!")
    code, _, err = run(
        capsys,
        "keys",
        "revoke",
        "--key-file",
        str(env / "root.key"),
        "--keylist",
        str(env / "keylist.cose"),
        "--kid",
        "00" * 16,
    )
    assert code == 1 and ErrorCode.PIN.value in err
    assert "wrong passphrase!" not in err
    data = bytearray((env / "keylist.cose").read_bytes())
    data[-3] ^= 0xFF
    (env / "keylist.cose").write_bytes(bytes(data))
    code, _, err = list_keylist(capsys, env)
    assert code == 1 and ErrorCode.SIGNATURE.value in err


def test_rsa_key_refused(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    ceremony(capsys, env)
    pub = rsa.generate_private_key(65537, 2048).public_key()
    (env / "rsa.pub").write_bytes(
        pub.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    code, _, err = run(
        capsys,
        "keys",
        "authorize",
        "--key-file",
        str(env / "root.key"),
        "--public-key",
        str(env / "rsa.pub"),
        "--vendor",
        "v.example",
        "--keylist",
        str(env / "keylist.cose"),
    )
    assert code == 1 and ErrorCode.ALGORITHM.value in err and "RSA" in err


def test_existing_key_file_not_overwritten(env: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ceremony(capsys, env)
    before = (env / "root.key").read_bytes()
    code, _, err = run(
        capsys,
        "keys",
        "init-root",
        "--key-file",
        str(env / "root.key"),
        "--out-public",
        str(env / "root2.pub"),
    )
    assert code == 1 and ErrorCode.EXISTS.value in err
    assert (env / "root.key").read_bytes() == before
