"""``release create --delta-from``: patches, their own signed manifests, the publishing rule,
the signing service's delta requests, and an end-to-end delta install on a simulated device."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

from otaguard.crypto.keys import PublicKey
from otaguard.crypto.software import SoftwareSigner
from otaguard.device.device import Device, Provisioning
from otaguard.device.lab import Lab, chunks
from otaguard.device.layout import LayoutConfig
from otaguard.device.transport import LocalFileTransport
from otaguard.errors import ErrorCode, OtaError, PolicyError
from otaguard.manifest.verify import verify_envelope
from otaguard.signing.policy import Requester, Role, SigningRequest
from otaguard.trust.model import StaticKeys

from .test_release_cli import PASS, SealKit, keyfile, release_args, run, seal  # noqa: F401
from .test_signing_http import Service, body, run_server


def firmware(seed: int, size: int = 60_000) -> bytes:
    """Compressible, code-like bytes (repeated instruction-ish words with small variations)."""
    rng = random.Random(seed)
    words = [rng.randbytes(4) for _ in range(300)]
    return b"".join(rng.choice(words) for _ in range(size // 4))


def evolve(old: bytes, seed: int) -> bytes:
    rng = random.Random(seed)
    b = bytearray(old)
    for _ in range(60):
        i = rng.randrange(len(b) - 4)
        b[i : i + 2] = rng.randbytes(2)
    return bytes(b[:20_000]) + rng.randbytes(500) + bytes(b[20_000:])


@pytest.fixture
def images(tmp_path: Path) -> tuple[Path, Path]:
    v1, v2 = tmp_path / "v1.bin", tmp_path / "v2.bin"
    old = firmware(1)
    v1.write_bytes(old)
    v2.write_bytes(evolve(old, 2))
    return v1, v2


def make(
    capsys: pytest.CaptureFixture[str],
    image: Path,
    out: Path,
    key: Path,
    log: Path,
    *extra: str | Path,
    **kw: Any,
) -> tuple[int, str, str]:
    return run(
        capsys, *release_args(image, out, **kw), "--key-file", key, "--audit-log", log, *extra
    )


def test_release_with_delta_and_device_install(
    tmp_path: Path,
    keyfile: tuple[Path, Path],  # noqa: F811
    seal: SealKit,  # noqa: F811
    images: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    key, pub = keyfile
    v1, v2 = images
    log = tmp_path / "audit.log"
    r1, r2 = tmp_path / "r1", tmp_path / "r2"
    assert make(capsys, v1, r1, key, log, *seal.args, version="1.0.0", min_version=None)[0] == 0
    rc, out, err = make(
        capsys, v2, r2, key, log, *seal.args, "--delta-from", r1, "--json", version="1.1.0",
        min_version=None, patch_uri_prefix="https://updates.example.com/p/",
    )  # fmt: skip
    assert rc == 0, err
    summary = json.loads(out)
    assert json.loads((r2 / "release.json").read_text()) == summary
    [d] = summary["deltas"]
    assert summary["deltas_skipped"] == []
    base_digest = hashlib.sha256(v1.read_bytes()).hexdigest()
    stem = base_digest[:16]
    assert (
        d["patch"] == f"patch-{stem}.ogdp"
        and d["manifest"]["file"] == f"manifest-delta-{stem}.suit"
    )
    assert sorted(p.name for p in r2.iterdir()) == sorted(
        ["image.bin", "manifest.suit", "release.json", d["patch"], d["manifest"]["file"]]
    )
    patch = (r2 / d["patch"]).read_bytes()
    xz = summary["delta_rule"]["xz_size"]
    assert d["patch_size"] == len(patch) <= 0.8 * xz
    assert d["pct_of_xz"] == round(100 * len(patch) / xz, 2) and d["base_version"] == "1.0.0"
    keys = StaticKeys([PublicKey.from_pem(pub.read_bytes())])
    full = verify_envelope((r2 / "manifest.suit").read_bytes(), keys).info
    delta = verify_envelope((r2 / d["manifest"]["file"]).read_bytes(), keys).info
    # same release, same sequence number; only the delta part differs
    assert dataclasses.replace(delta, delta=None) == full
    assert delta.delta is not None
    assert delta.delta.base_digest.hex() == base_digest
    assert delta.delta.patch_digest == hashlib.sha256(patch).digest()
    assert delta.delta.patch_size == len(patch)
    assert delta.delta.patch_uri == f"https://updates.example.com/p/{d['patch']}"
    # the audit log records the delta signature with its base
    rc, out, _ = run(capsys, "audit", "show", log, "--json", "--op", "sign-manifest")
    recs = json.loads(out)["records"]
    assert [r["subject"]["delta"] for r in recs][:2] == [None, None]
    assert recs[2]["subject"]["delta"]["base_digest"] == base_digest
    assert recs[2]["subject"]["sequence"] == summary["sequence"]
    rc, out, _ = run(
        capsys, "audit", "verify", log, *seal.verify, "--state", f"{log}.state.sqlite", "--json"
    )
    assert rc == 0 and json.loads(out)["valid"]

    # --- end to end: a device running v1 installs v2 from the delta (offline transport) ---
    dev_dir = tmp_path / "device"
    lab = Lab(
        vendor="example.com", model="thermo", hw_rev="B", now=int(time.time()),
        op=SoftwareSigner.load(key, PASS.encode()),
    )  # fmt: skip  # the release key, authorized by a throwaway root
    prov = Provisioning(
        bundle=lab.bundle,
        vendor_id=full.vendor_id,
        class_id=full.class_id,
        model="thermo",
        hw_rev="B",
        factory_manifest=(r1 / "manifest.suit").read_bytes(),
    )
    cfg = LayoutConfig(slot_size=32 * 4096)
    with Device.create(dev_dir, cfg, prov, chunks(v1.read_bytes())) as dev:
        assert dev.boot().version == "1.0.0"
        t = LocalFileTransport(
            r2 / "manifest.suit",
            r2 / "image.bin",
            delta_manifest=r2 / d["manifest"]["file"],
            patch=r2 / d["patch"],
        )
        res = dev.install(t)
    assert (res.method, res.bytes_received, t.bytes_read) == ("delta", len(patch), len(patch))
    with capsys.disabled():
        print(
            f"\ndelta e2e: {t.bytes_read} bytes transferred for a {full.image_size}-byte image "
            f"({100 * t.bytes_read / full.image_size:.1f}%, xz -9e would be {xz})"
        )
    with Device(dev_dir) as dev:
        r = dev.boot()
        assert (r.mode, r.version) == ("test", "1.1.0")
        dev.confirm()
    with Device(dev_dir) as dev:
        r = dev.boot()
        assert (r.mode, r.version) == ("normal", "1.1.0")
        region = dev.layout.slots[r.slot]
        assert dev.flash.read(region.image_offset, full.image_size) == v2.read_bytes()

    # the offline CLI path: --manifest (delta) --patch, no full image
    dev2 = tmp_path / "device2"
    with Device.create(dev2, cfg, prov, chunks(v1.read_bytes())) as dev:
        dev.boot()
    rc, out, err = run(
        capsys, "device", "install", "--dir", dev2, "--manifest", r2 / d["manifest"]["file"],
        "--patch", r2 / d["patch"], "--json",
    )  # fmt: skip
    assert rc == 0, err
    assert json.loads(out)["method"] == "delta", out


def test_no_delta_when_not_clearly_smaller(
    tmp_path: Path,
    keyfile: tuple[Path, Path],  # noqa: F811
    capsys: pytest.CaptureFixture[str],
) -> None:
    key, _ = keyfile
    log = tmp_path / "audit.log"
    v1, v2 = tmp_path / "v1.bin", tmp_path / "v2.bin"
    v1.write_bytes(os.urandom(30_000))  # like an encrypted image: nothing to share
    v2.write_bytes(os.urandom(30_000))
    assert make(capsys, v1, tmp_path / "r1", key, log, version="1.0.0", min_version=None)[0] == 0
    rc, out, err = make(
        capsys, v2, tmp_path / "r2", key, log, "--delta-from", tmp_path / "r1",
        version="1.1.0", min_version=None,
    )  # fmt: skip
    assert rc == 0, err
    assert "no delta  from 1.0.0: patch" in out and "not clearly smaller" in out
    summary = json.loads((tmp_path / "r2" / "release.json").read_text())
    assert summary["deltas"] == []
    [s] = summary["deltas_skipped"]
    assert s["pct_of_xz"] > 80 and "not clearly smaller" in s["reason"]
    assert sorted(p.name for p in (tmp_path / "r2").iterdir()) == [
        "image.bin", "manifest.suit", "release.json"
    ]  # fmt: skip
    # a factor of 1.0 does not rescue a patch larger than xz either (random data)
    rc, _, _ = make(
        capsys, v2, tmp_path / "r3", key, log, "--delta-from", tmp_path / "r1",
        "--delta-factor", "1", version="1.2.0", min_version=None,
    )  # fmt: skip
    assert rc == 0


def test_delta_from_another_class_is_refused(
    tmp_path: Path,
    keyfile: tuple[Path, Path],  # noqa: F811
    images: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
) -> None:
    key, _ = keyfile
    v1, v2 = images
    log = tmp_path / "audit.log"
    assert make(capsys, v1, tmp_path / "r1", key, log, hw_rev="C", min_version=None)[0] == 0
    rc, _, err = make(
        capsys, v2, tmp_path / "r2", key, log, "--delta-from", tmp_path / "r1",
        version="1.5.0", min_version=None,
    )  # fmt: skip
    assert rc == 1 and "E_CLASS_ID" in err
    assert not (tmp_path / "r2").exists() and not list(tmp_path.glob(".r2.tmp-*"))
    # a base whose image no longer matches its release.json
    (tmp_path / "r1" / "image.bin").write_bytes(b"tampered")
    rc, _, err = make(
        capsys, v2, tmp_path / "r2", key, log, "--delta-from", tmp_path / "r1",
        version="1.5.0", min_version=None, hw_rev="C",
    )  # fmt: skip
    assert rc == 1 and "E_IMAGE_DIGEST" in err and not (tmp_path / "r2").exists()


def test_release_with_delta_via_signing_service(
    tmp_path: Path,
    images: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    s = Service(tmp_path / "svc")
    pub = tmp_path / "svc.pub.pem"
    pub.write_bytes(s.signer.public_key.to_pem())
    v1, v2 = images
    monkeypatch.setenv("OTAGUARD_SIGNING_TOKEN", s.tokens["ci"])
    with run_server(s.app) as url:
        common = ["--signing-url", url, "--trust-key", pub]
        a1 = release_args(v1, tmp_path / "r1", hw_rev="A", version="2.0.0", min_version=None)
        assert run(capsys, *a1, *common)[0] == 0
        a2 = release_args(v2, tmp_path / "r2", hw_rev="A", version="2.1.0", min_version=None)
        rc, out, err = run(capsys, *a2, *common, "--delta-from", tmp_path / "r1", "--json")
        assert rc == 0, err
    s.service.close()
    summary = json.loads(out)
    [d] = summary["deltas"]
    keys = StaticKeys([s.signer.public_key])
    info = verify_envelope((tmp_path / "r2" / d["manifest"]["file"]).read_bytes(), keys).info
    assert info.sequence_number == summary["sequence"] and info.delta is not None


def test_service_signs_deltas_only_for_signed_releases(tmp_path: Path) -> None:
    s = Service(tmp_path / "svc")
    ci = Requester("ci", Role.RELEASE)
    req = SigningRequest.from_dict(body(model="thermo", version="3.0.0"))
    full = s.service.sign_release(req, ci)
    delta = dataclasses.replace(
        req, delta_base_digest=b"\x01" * 32, delta_patch_digest=b"\x02" * 32, delta_patch_size=99
    )
    # JSON round trip (the remote path) keeps the delta fields
    assert SigningRequest.from_dict(json.loads(json.dumps(delta.to_dict()))) == delta
    signed = s.service.sign_release(delta, ci)
    assert signed.sequence == full.sequence and signed.info.delta == delta.delta
    # a delta for a release never signed, or saying something else than the signed release
    for bad in (
        dataclasses.replace(delta, version="3.0.1"),
        dataclasses.replace(delta, expires=int(time.time()) + 7 * 86400),
        dataclasses.replace(delta, image_digest=b"\x03" * 32),
        dataclasses.replace(delta, description="other text"),
    ):
        with pytest.raises(PolicyError) as ei:
            s.service.sign_release(bad, ci)
        assert ei.value.code == ErrorCode.POLICY
    # partial delta fields are malformed
    with pytest.raises(OtaError) as e2:
        dataclasses.replace(req, delta_base_digest=b"\x01" * 32).validate()
    assert e2.value.code == ErrorCode.MALFORMED
    # another requester without a grant for the model still cannot sign a delta for it
    with pytest.raises(PolicyError) as e3:
        s.service.sign_release(delta, Requester("outsider", Role.RELEASE))
    assert e3.value.code == ErrorCode.POLICY
    s.service.close()
