"""MCUboot images on the update server over real mTLS: upload checks, per-class format, the
check-in offer through a campaign, and the download checked with MCUboot's imgtool."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from otaguard.crypto.software import SoftwareSigner
from otaguard.manifest.ids import class_id
from otaguard.mcuboot.image import Geometry, ImageVersion, sign_image
from otaguard.server.context import TrustState
from otaguard.server.pki.ca import FleetCA
from otaguard.trust.model import StaticKeys
from tests.pg import Harness, db_url, fleet_ca, harness, pg_cluster, server_tls  # noqa: F401
from tests.test_server_api import SIGNER, VENDOR, admin, publish

from .mcuboot_support import assert_imgtool_accepts


@pytest.fixture
def hxt(db_url: str, fleet_ca: FleetCA, server_tls: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    with harness(
        db_url, fleet_ca, server_tls, tmp_path, trust=TrustState(StaticKeys([SIGNER.public_key]))
    ) as h:
        yield h


def mcuboot(image: bytes, version: str = "1.1.0", counter: int = 1, signer: Any = SIGNER) -> bytes:
    return sign_image(image, ImageVersion.from_release(version), counter, signer, Geometry())


def attach(h: Harness, rid: int, data: bytes) -> tuple[int, dict[str, Any]]:
    rm = admin(h, "release-manager")
    r = rm.post("/admin/v1/images", content=data)
    assert r.status_code == 201, r.text
    r = rm.post(f"/admin/v1/releases/{rid}/mcuboot", params={"image": r.json()["blob"]})
    return r.status_code, r.json()


def test_mcuboot_upload_offer_and_download(hxt: Harness, tmp_path: Path) -> None:
    image = os.urandom(50_000)
    rid = publish(hxt, "1.1.0", image)  # class gw/r1, SEC_CNT 1
    good = mcuboot(image)
    # --- upload refusals: nothing the devices would have to refuse is stored ---------------
    other = SoftwareSigner(ed25519.Ed25519PrivateKey.generate())
    bad = bytearray(good)
    bad[100] ^= 1
    cases = [
        (mcuboot(image, signer=other), 400, "E_UNTRUSTED_KEY"),
        (bytes(bad), 400, "E_DIGEST"),
        (mcuboot(image, counter=2), 409, "E_CONFLICT"),
        (mcuboot(image, version="1.1.1"), 409, "E_CONFLICT"),
        (mcuboot(image[:-1] + bytes([image[-1] ^ 1])), 409, "E_CONFLICT"),
        (b"\x00" * 64, 400, "E_MALFORMED"),
    ]
    for data, status, code in cases:
        got = attach(hxt, rid, data)
        assert (got[0], got[1].get("error")) == (status, code), got
    assert attach(hxt, 999, good)[0] == 404
    status, body = attach(hxt, rid, good)
    assert status == 201, body
    assert body["mcuboot_version"] == "1.1.0+0" and body["key_id"] == SIGNER.public_key.key_id.hex()
    assert attach(hxt, rid, good)[1]["error"] == "E_EXISTS"

    # --- a SUIT class (gw/r2) next to the MCUboot class (gw/r1) -----------------------------
    rid2 = publish(hxt, "1.1.0", image, hw_rev="r2")
    cid = str(class_id(VENDOR, "gw", "r1"))
    rm, op = admin(hxt, "release-manager"), admin(hxt, "operator")
    r = op.put(f"/admin/v1/classes/{cid}/format", json={"format": "mcuboot"})
    assert r.status_code == 403  # an operator may not choose what a class installs
    r = rm.put(f"/admin/v1/classes/{cid}/format", json={"format": "mcuboot"})
    assert r.status_code == 200 and r.json() == {"class_id": cid, "format": "mcuboot"}
    for bad_body in ({"format": "tuf"}, {"format": "mcuboot", "x": 1}):
        r = rm.put(f"/admin/v1/classes/{cid}/format", json=bad_body)
        assert (r.status_code, r.json()["error"]) == (400, "E_MALFORMED")
    r = rm.put("/admin/v1/classes/not-a-uuid/format", json={"format": "mcuboot"})
    assert (r.status_code, r.json()["error"]) == (400, "E_MALFORMED")

    mcu, suit = hxt.enroll("MCU-1", hw_rev="r1"), hxt.enroll("SUIT-1", hw_rev="r2")
    dev, sdev = hxt.client(mcu), hxt.client(suit)
    for c in (dev, sdev):  # campaigns admit devices that reported a version
        r = c.post("/v1/checkin", json={"version": "1.0.0", "security_counter": 1})
        assert r.status_code == 200 and r.json()["update"] is None
    spec = {"id": "mixed-1", "release_id": rid, "selector": {"model": "gw", "hw_rev": "r1"}}
    r = op.post("/admin/v1/campaigns", json={**spec, "phases": [{"fraction": 1.0}]})
    assert r.status_code == 201, r.text
    r = op.post("/admin/v1/campaigns/mixed-1/start")
    assert r.status_code == 200, r.text
    r = op.post("/admin/v1/assignments", json={"serial": "SUIT-1", "release_id": rid2})
    assert r.status_code == 201

    upd = dev.post("/v1/checkin", json={"version": "1.0.0", "security_counter": 1}).json()
    upd = upd["update"]
    assert upd is not None and upd["format"] == "mcuboot", upd
    assert "manifest_url" not in upd and upd["mcuboot_version"] == "1.1.0+0"
    assert upd["image_url"] == f"/v1/images/{body['blob']}" and upd["image_size"] == len(good)
    got = dev.get(upd["image_url"])
    assert got.status_code == 200 and got.content == good
    path = tmp_path / "downloaded.mcuboot.bin"
    path.write_bytes(got.content)
    assert_imgtool_accepts(path, SIGNER.public_key)

    supd = sdev.post("/v1/checkin", json={"version": "1.0.0", "security_counter": 1}).json()
    supd = supd["update"]
    assert supd["format"] == "suit" and supd["manifest_url"].startswith("/v1/manifests/")
    assert sdev.get(upd["image_url"]).status_code == 404  # not offered to this device

    # an MCUboot class with a release that has no MCUboot image: nothing to offer
    assert op.post("/admin/v1/campaigns/mixed-1/abort").status_code == 200
    rid3 = publish(hxt, "1.2.0", os.urandom(1000))
    r = op.post("/admin/v1/assignments", json={"serial": "MCU-1", "release_id": rid3})
    assert r.status_code == 201
    res = dev.post("/v1/checkin", json={"version": "1.0.0", "security_counter": 1}).json()
    assert res["update"] is None
    # back to SUIT for that class: offered the SUIT manifest again
    assert rm.put(f"/admin/v1/classes/{cid}/format", json={"format": "suit"}).status_code == 200
    res = dev.post("/v1/checkin", json={"version": "1.0.0", "security_counter": 1}).json()
    assert res["update"]["format"] == "suit"
