"""``release create --format mcuboot``: the MCUboot image next to SUIT, same request, policy and
audit log; every image checked with MCUboot's imgtool."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from otaguard.crypto.keys import PublicKey
from otaguard.crypto.software import SoftwareSigner
from otaguard.manifest.verify import verify_envelope
from otaguard.mcuboot.image import ImageVersion, verify_image
from otaguard.signing.audit import read_records
from otaguard.trust.model import StaticKeys

from .mcuboot_support import assert_imgtool_accepts, imgtool_dumpinfo, sec_cnt_of
from .test_release_cli import PASS, release_args, run

SLOT = 64 * 1024


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "fw.bin"
    p.write_bytes(os.urandom(20_000))
    return p


def _key(tmp: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, PublicKey]:
    monkeypatch.setenv("OTAGUARD_KEY_PASSPHRASE", PASS)
    key = tmp / f"release-{kind}.key"
    return key, SoftwareSigner.generate(key, kind, PASS.encode())  # type: ignore[arg-type]


def check_mcuboot_release(out: Path, key: PublicKey, image: Path) -> dict[str, Any]:
    assert sorted(p.name for p in out.iterdir()) == [
        "image.bin", "image.mcuboot.bin", "manifest.suit", "release.json",
    ]  # fmt: skip
    summary: dict[str, Any] = json.loads((out / "release.json").read_text())
    mc = out / "image.mcuboot.bin"
    assert_imgtool_accepts(mc, key)
    info = imgtool_dumpinfo(mc)
    assert info["header"]["version"] == summary["mcuboot"]["version"]
    assert str(ImageVersion.from_release(summary["version"])) == info["header"]["version"]
    assert sec_cnt_of(info) == summary["security_counter"] == summary["mcuboot"]["security_counter"]
    v = verify_image(mc.read_bytes(), [key])
    assert bytes(v.parsed.image) == image.read_bytes()
    vm = verify_envelope((out / "manifest.suit").read_bytes(), StaticKeys([key]))
    assert vm.info.security_counter == v.security_counter
    assert summary["mcuboot"]["size"] == mc.stat().st_size
    assert summary["mcuboot"]["tlv_overhead"] == mc.stat().st_size - 20_000
    return summary


@pytest.mark.parametrize("kind", ["ed25519", "p256"])
def test_local_release_writes_an_imgtool_valid_mcuboot_image(
    tmp_path: Path,
    image: Path,
    kind: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key, pub = _key(tmp_path, kind, monkeypatch)
    out, log = tmp_path / "rel", tmp_path / "audit.log"
    rc, stdout, err = run(
        capsys, *release_args(image, out, version="1.4.7", security_counter="12"),
        "--key-file", key, "--audit-log", log, "--format", "mcuboot",
        "--slot-size", str(SLOT), "--json",
    )  # fmt: skip
    assert rc == 0, err
    summary = check_mcuboot_release(out, pub, image)
    assert json.loads(stdout) == summary
    assert summary["mcuboot"]["version"] == "1.4.7+0"
    # one audit record per artifact, in one log, the MCUboot one naming the same release
    recs = [r for r in read_records(log) if r.op in ("sign-manifest", "sign-mcuboot")]
    assert [r.op for r in recs] == ["sign-manifest", "sign-mcuboot"]
    assert recs[1].subject["sequence"] == recs[0].subject["sequence"] == summary["sequence"]
    assert recs[1].subject["mcuboot_sha256"] == summary["mcuboot"]["sha256"]
    assert summary["mcuboot"]["audit"]["seq"] == recs[1].seq


@pytest.mark.softhsm
@pytest.mark.parametrize("kind", ["ed25519", "p256"])
def test_release_with_softhsm_key_writes_mcuboot_image(
    tmp_path: Path,
    softhsm_token: Any,
    image: Path,
    kind: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from otaguard.crypto.pkcs11 import generate_keypair

    t = softhsm_token
    pk = generate_keypair(t.label, "mcu-release", kind, pin=t.pin, module=t.module)
    monkeypatch.setenv("OTAGUARD_PKCS11_PIN", t.pin)
    out = tmp_path / "rel"
    rc, _, err = run(
        capsys, *release_args(image, out), "--pkcs11-uri", t.uri("mcu-release"),
        "--pkcs11-module", t.module, "--audit-log", tmp_path / "audit.log",
        "--format", "mcuboot", "--slot-size", str(SLOT),
    )  # fmt: skip
    assert rc == 0, err
    check_mcuboot_release(out, pk, image)


def test_bad_mcuboot_input_is_refused_before_anything_is_signed(
    tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    key, _ = _key(tmp_path, "ed25519", monkeypatch)
    log = tmp_path / "audit.log"
    local = ["--key-file", key, "--audit-log", log, "--format", "mcuboot"]
    cases: list[tuple[dict[str, str], list[str], str]] = [
        ({}, ["--slot-size", "20000"], "E_SLOT_FULL"),  # image + TLVs + trailer > slot
        ({"version": "256.0.0"}, [], "E_FIELD_RANGE"),
        ({"version": "1.2.65536"}, [], "E_FIELD_RANGE"),
        ({"security_counter": str(2**32)}, [], "E_FIELD_RANGE"),
    ]
    for i, (kw, extra, code) in enumerate(cases):
        out = tmp_path / f"r{i}"
        rc, _, err = run(capsys, *release_args(image, out, **kw), *local, *extra)
        assert rc == 1 and code in err, (kw, err)
        assert not out.exists()
    # nothing was signed: no signature record in the audit log (if it exists at all)
    ops = [r.op for r in read_records(log)] if log.exists() else []
    assert "sign-manifest" not in ops and "sign-mcuboot" not in ops
    rc, _, err = run(
        capsys, *release_args(image, tmp_path / "x"), "--key-file", key, "--audit-log", log,
        "--slot-size", "100000",
    )  # fmt: skip
    assert rc == 2 and "E_USAGE" in err  # --slot-size without --format mcuboot
    rc, _, err = run(
        capsys, *release_args(image, tmp_path / "x"), "--signing-url", "http://127.0.0.1:9",
        "--cosign", "--format", "mcuboot",
    )  # fmt: skip
    assert rc == 2 and "E_USAGE" in err  # not with co-signing (refused before any request)


def test_policy_floors_hold_for_mcuboot(
    tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    key, _ = _key(tmp_path, "p256", monkeypatch)
    log = tmp_path / "audit.log"
    local = ["--key-file", key, "--audit-log", log, "--format", "mcuboot"]
    rc, _, err = run(capsys, *release_args(image, tmp_path / "r1", security_counter="5"), *local)
    assert rc == 0, err
    rc, _, err = run(
        capsys,
        *release_args(image, tmp_path / "r2", version="1.5.0", security_counter="4"),
        *local,
    )
    assert rc == 1 and "E_SECURITY_COUNTER" in err
    assert not (tmp_path / "r2").exists()


def test_service_signs_mcuboot_only_for_a_signed_release_within_the_floors(
    tmp_path: Path,
) -> None:
    """The service's own MCUboot path: same policy, same floors, audited refusals."""
    import hashlib

    from otaguard.errors import ErrorCode, OtaError
    from otaguard.mcuboot.image import Geometry

    from .test_signing_service import CI, NOW, Env, make_request

    env = Env(tmp_path)
    img = os.urandom(4096)
    geo = Geometry(slot_size=SLOT)

    def req(**kw: Any) -> Any:
        return make_request(image_digest=hashlib.sha256(img).digest(), **kw)

    def code(fn: Any) -> ErrorCode:
        with pytest.raises(OtaError) as e:
            fn()
        return e.value.code

    svc = env.service
    # nothing signed yet: E_POLICY (sign the release first)
    assert code(lambda: svc.sign_mcuboot(req(security_counter=5), CI, img, geo)) == "E_POLICY"
    svc.sign_release(req(security_counter=5, version="1.2.0"), CI)
    signed = svc.sign_mcuboot(req(security_counter=5, version="1.2.0"), CI, img, geo)
    v = verify_image(signed.image, [env.signer.public_key])
    assert (str(v.version), v.security_counter) == ("1.2.0+0", 5)
    # under the counter floor: the floor's code, from the same policy check
    low = req(security_counter=4, version="1.3.0")
    assert code(lambda: svc.sign_mcuboot(low, CI, img, geo)) == ErrorCode.SECURITY_COUNTER
    old = req(security_counter=5, version="1.1.0")
    assert code(lambda: svc.sign_mcuboot(old, CI, img, geo)) == ErrorCode.DOWNGRADE
    # another field than the signed release says (expiry): not that release, so the floors
    # apply (same version again: E_DOWNGRADE); above the floors but never signed: E_POLICY
    other = req(security_counter=5, version="1.2.0", expires=NOW + 7200)
    assert code(lambda: svc.sign_mcuboot(other, CI, img, geo)) == ErrorCode.DOWNGRADE
    unsigned = req(security_counter=6, version="1.3.0")
    assert code(lambda: svc.sign_mcuboot(unsigned, CI, img, geo)) == ErrorCode.POLICY
    # other bytes than the request names; a slot too small
    good = req(security_counter=5, version="1.2.0")
    assert code(lambda: svc.sign_mcuboot(good, CI, img[::-1], geo)) == ErrorCode.DIGEST
    assert code(lambda: svc.sign_mcuboot(good, CI, img, Geometry(5000))) == ErrorCode.SLOT_FULL
    ops = [r.op for r in read_records(tmp_path / "audit.log")]
    assert ops.count("sign-mcuboot") == 1
    assert ops.count("sign-refused") == 5  # every policy refusal is audited


def test_release_via_signing_service_writes_mcuboot_image(
    tmp_path: Path, image: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from .test_signing_http import Service, run_server

    s = Service(tmp_path / "svc")
    pub = tmp_path / "svc.pub.pem"
    pub.write_bytes(s.signer.public_key.to_pem())
    mc = ["--format", "mcuboot", "--slot-size", str(SLOT), "--mcuboot-header-size", "512"]
    with run_server(s.app) as url:
        monkeypatch.setenv("OTAGUARD_SIGNING_TOKEN", s.tokens["ci"])
        out = tmp_path / "rel"
        rc, _, err = run(
            capsys, *release_args(image, out, hw_rev="A"), "--signing-url", url,
            "--trust-key", pub, *mc,
        )  # fmt: skip
        assert rc == 0, err
        summary = check_mcuboot_release(out, s.signer.public_key, image)
        assert summary["mcuboot"]["header_size"] == 512
        # too small a slot: refused before the service is asked for anything
        before = len(list(read_records(s.log_path)))
        rc, _, err = run(
            capsys, *release_args(image, tmp_path / "r2", hw_rev="A", version="1.5.0"),
            "--signing-url", url, "--format", "mcuboot", "--slot-size", "21000",
        )  # fmt: skip
        assert rc == 1 and "E_SLOT_FULL" in err
        assert len(list(read_records(s.log_path))) == before
    recs = [r.op for r in read_records(s.log_path)]
    assert recs.count("sign-manifest") == 1 and recs.count("sign-mcuboot") == 1


def test_sign_mcuboot_endpoint_refusals(tmp_path: Path) -> None:
    """POST /v1/sign-mcuboot: credential and role first, then the body, each with its code;
    a good request for a signed release gets only the TLV area back."""
    import base64
    import hashlib
    import time

    import httpx

    from .test_signing_http import Service, body, run_server

    s = Service(tmp_path / "svc")
    img = os.urandom(3000)
    req = body(
        image_digest=hashlib.sha256(img).hexdigest(), image_size=len(img), hw_rev="Z",
        expires=int(time.time()) + 86400,
    )  # fmt: skip
    good = {"request": req, "image": base64.b64encode(img).decode(), "slot_size": SLOT}

    with run_server(s.app) as url:

        def post(token: str | None, payload: Any) -> httpx.Response:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            return httpx.post(f"{url}/v1/sign-mcuboot", json=payload, headers=headers, timeout=30)

        def refused(token: str | None, payload: Any, status: int, code: str) -> None:
            r = post(token, payload)
            assert (r.status_code, r.json()["error"]) == (status, code), r.text

        ci = s.tokens["ci"]
        refused(None, good, 401, "E_AUTH")
        refused(s.tokens["viewer"], good, 403, "E_FORBIDDEN")
        refused(ci, {**good, "extra": 1}, 400, "E_MALFORMED")
        refused(ci, {**good, "image": "***"}, 400, "E_MALFORMED")
        refused(ci, {**good, "header_size": 8}, 400, "E_FIELD_RANGE")
        refused(ci, {**good, "slot_size": 4000}, 400, "E_SLOT_FULL")
        refused(ci, {**good, "image": base64.b64encode(img[1:]).decode()}, 400, "E_DIGEST")
        refused(ci, good, 403, "E_POLICY")  # no such release signed yet
        r = httpx.post(
            f"{url}/v1/sign", json=req, headers={"Authorization": f"Bearer {ci}"}, timeout=30
        )
        assert r.status_code == 200, r.text
        r = post(ci, good)
        assert r.status_code == 200, r.text
        ans = r.json()
        tlvs = base64.b64decode(ans["tlvs"])
        assert len(tlvs) == 144 and ans["version"] == "1.0.0+0"  # Ed25519: info + 3 TLVs
        assert ans["mcuboot_size"] == 32 + len(img) + 12 + len(tlvs)
