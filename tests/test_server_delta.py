"""Deltas on the update server over real mTLS: upload checks, offer by running digest, Range
resume on a patch, and the device HTTPS client + agent installing through the delta."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import dataclasses
import hashlib
import random
from pathlib import Path

import pytest

from otaguard.adminclient import AdminError
from otaguard.delta import create_patch
from otaguard.device.https_transport import HttpsTransport
from otaguard.device.lab import Lab, image_bytes
from otaguard.device.layout import LayoutConfig
from otaguard.manifest.build import build_envelope
from otaguard.manifest.model import DeltaInfo
from otaguard.manifest.verify import verify_envelope
from otaguard.server.context import TrustState
from otaguard.server.pki.ca import FleetCA
from otaguard.server.pki.enroll import Enrollment
from otaguard.trust.model import StaticKeys
from tests.pg import Harness, db_url, fleet_ca, harness, pg_cluster, server_tls  # noqa: F401
from tests.test_server_api import SIGNER, admin_client, make_release, publish


def evolve(old: bytes, seed: int) -> bytes:
    rng = random.Random(seed)
    b = bytearray(old)
    for _ in range(50):
        i = rng.randrange(len(b) - 4)
        b[i : i + 3] = rng.randbytes(3)
    return bytes(b[:30_000]) + rng.randbytes(700) + bytes(b[30_000:])


V1 = image_bytes(120_000, 11)
V2 = evolve(V1, 12)
PATCH = create_patch(V1, V2)


def delta_envelope(version: str, image: bytes, base: bytes, patch: bytes, **kw: object) -> bytes:
    full = verify_envelope(make_release(version, image), StaticKeys([SIGNER.public_key])).info
    d = DeltaInfo(hashlib.sha256(base).digest(), hashlib.sha256(patch).digest(), len(patch), None)
    return build_envelope(dataclasses.replace(full, delta=d, **kw), [SIGNER])  # type: ignore[arg-type]


@pytest.fixture
def hxt(db_url: str, fleet_ca: FleetCA, server_tls: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    with harness(
        db_url, fleet_ca, server_tls, tmp_path, trust=TrustState(StaticKeys([SIGNER.public_key]))
    ) as h:
        yield h


def upload_delta(h: Harness, rid: int, envelope: bytes, patch: bytes) -> tuple[int, dict]:  # type: ignore[type-arg]
    rm = admin_client(h, "release-manager")
    blob = rm.upload_blob(patch)["blob"]
    try:
        return 201, dict(rm.create_delta(rid, envelope, blob, base_version="1.0.0"))
    except AdminError as err:
        return err.status, err.to_dict()


def transport(h: Harness, e: Enrollment) -> HttpsTransport:
    return HttpsTransport(
        h.url, ca_file=e.ca_path, cert_file=e.cert_path, key_file=e.key_path,  # type: ignore[arg-type]
        sleep=lambda s: None, rng=random.Random(1),
    )  # fmt: skip


def test_delta_offer_by_running_digest_and_range(hxt: Harness) -> None:
    rid = publish(hxt, "1.1.0", V2)
    # --- upload refusals: each checked like a release -------------------------------------
    code, body = upload_delta(hxt, rid, make_release("1.1.0", V2), PATCH)
    assert (code, body["error"]) == (400, "E_MALFORMED")  # not a delta manifest
    bad = delta_envelope("1.1.0", V2, V1, PATCH, security_counter=2)
    code, body = upload_delta(hxt, rid, bad, PATCH)
    assert (code, body["error"]) == (409, "E_CONFLICT")  # not this release
    code, body = upload_delta(hxt, rid, delta_envelope("1.1.0", V2, V1, PATCH), PATCH[:-1])
    assert (code, body["error"]) == (400, "E_IMAGE_SIZE")
    flipped = bytearray(PATCH)
    flipped[-10] ^= 1
    code, body = upload_delta(hxt, rid, delta_envelope("1.1.0", V2, V1, PATCH), bytes(flipped))
    assert (code, body["error"]) == (400, "E_IMAGE_DIGEST")
    other = create_patch(V1, V1[::-1])  # signed, but produces another image
    code, body = upload_delta(hxt, rid, delta_envelope("1.1.0", V2, V1, other), other)
    assert (code, body["error"]) == (400, "E_DELTA_CORRUPT")
    # unsigned-by-a-trusted-key delta manifests are refused too
    forged = bytearray(delta_envelope("1.1.0", V2, V1, PATCH))
    forged[-3] ^= 1
    code, body = upload_delta(hxt, rid, bytes(forged), PATCH)
    assert code == 400 and body["error"].startswith("E_")
    code, body = upload_delta(hxt, rid, delta_envelope("1.1.0", V2, V1, PATCH), PATCH)
    assert code == 201, body
    code, body = upload_delta(hxt, rid, delta_envelope("1.1.0", V2, V1, PATCH), PATCH)
    assert code == 409  # one delta per base

    op = admin_client(hxt, "operator")
    base_hex = hashlib.sha256(V1).hexdigest()
    enrolled = {}
    for serial in ("SN-D1", "SN-D2"):
        enrolled[serial] = hxt.enroll(serial)
        op.assign(serial, rid)
    # a device running the base gets the delta AND the full image reference
    dev1 = transport(hxt, enrolled["SN-D1"])
    upd = dev1.checkin({"version": "1.0.0", "running_digest": base_hex})
    assert upd is not None and upd["image_url"].startswith("/v1/images/")
    d = upd["delta"]
    assert d["base_digest"] == base_hex and d["patch_size"] == len(PATCH)
    assert d["patch_digest"] == hashlib.sha256(PATCH).hexdigest()
    env = dev1.fetch_delta_manifest()
    assert env is not None
    info = verify_envelope(env, StaticKeys([SIGNER.public_key])).info
    assert info.delta is not None and info.delta.base_digest.hex() == base_hex
    # Range resume on the patch: first part, drop, then the rest from the offset
    first = b"".join(dev1.open_patch(0))[:1234]
    rest = b"".join(dev1.open_patch(len(first)))
    assert first + rest == PATCH
    c = hxt.client(enrolled["SN-D1"])
    r = c.get(d["patch_url"], headers={"Range": "bytes=100-199"})
    assert r.status_code == 206 and r.content == PATCH[100:200]
    assert r.headers["content-range"] == f"bytes 100-199/{len(PATCH)}"
    dev1.close()
    # a device running something else gets only the full image
    dev2 = transport(hxt, enrolled["SN-D2"])
    upd2 = dev2.checkin({"version": "1.0.0", "running_digest": "ab" * 32})
    assert upd2 is not None and "delta" not in upd2
    assert dev2.fetch_delta_manifest() is None
    # a device without this release assigned may not fetch its patch or delta manifest
    e3 = hxt.enroll("SN-D3")
    c3 = hxt.client(e3)
    assert c3.get(d["patch_url"]).status_code == 404
    assert c3.get(d["manifest_url"]).status_code == 404
    dev2.close()


def test_device_installs_through_server_delta(hxt: Harness, tmp_path: Path) -> None:
    """Agent + HTTPS transport: delta preferred, bytes counted, boots into 1.1.0."""
    lab = Lab(vendor="example.com", model="gw", hw_rev="r1", op=SIGNER)
    cfg = LayoutConfig(slot_size=40 * 4096)
    rid = publish(hxt, "1.1.0", V2)
    code, _ = upload_delta(hxt, rid, delta_envelope("1.1.0", V2, V1, PATCH), PATCH)
    assert code == 201
    e = hxt.enroll("SN-D9")
    admin_client(hxt, "operator").assign("SN-D9", rid)
    with lab.provision(tmp_path / "dev", V1, cfg=cfg, version="1.0.0", seq=100) as dev:
        dev.boot()
        t = transport(hxt, e)
        facts = dev.checkin_facts()
        assert facts["running_digest"] == hashlib.sha256(V1).hexdigest()
        assert t.checkin(facts) is not None
        res = dev.install(t)
        assert (res.method, res.bytes_received) == ("delta", len(PATCH))
        t.close()
        r = dev.boot()
        assert (r.mode, r.version) == ("test", "1.1.0")
        dev.confirm()
        assert dev.boot().version == "1.1.0"
    print(f"\nserver delta: {len(PATCH)} patch bytes instead of a {len(V2)}-byte image")
