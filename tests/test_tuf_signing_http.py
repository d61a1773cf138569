"""``POST /v1/sign-tuf-targets``: the CI path to TUF targets, through the signing service's
one policy check, keys, rate limit and audit log."""

from __future__ import annotations

import hashlib
from pathlib import Path

import httpx
import pytest
from tuf.api.metadata import Metadata, Targets

from otaguard.errors import ErrorCode, OtaError
from otaguard.signing.audit import read_records
from otaguard.signing.client import SigningClient
from otaguard.signing.policy import SigningRequest
from otaguard.tufrepo.signer import tuf_key
from tests.test_signing_http import Service, body, post, run_server


def test_service_signs_tuf_targets_for_its_releases(tmp_path: Path) -> None:
    s = Service(tmp_path)
    try:
        with run_server(s.app) as url:
            req = body(version="1.0.0", expires=body()["expires"] + 86400)
            r = post(url, s.tokens["ci"], req)
            assert r.status_code == 200, r.text
            sequence = r.json()["sequence"]
            with SigningClient(url, s.tokens["ci"]) as c:
                data, version, head = c.sign_tuf_targets(SigningRequest.from_dict(req))
                assert version == sequence
                md = Metadata[Targets].from_bytes(data)
                key = tuf_key(s.signer.public_key)
                key.verify_signature(md.signatures[key.keyid], md.signed_bytes)
                target = md.signed.targets["thermo/A/image.bin"]
                assert target.hashes["sha256"] == "ab" * 32 and target.length == 1234
                # a release it never signed: refused with the policy's code
                other = SigningRequest.from_dict(body(version="9.0.0"))
                with pytest.raises(OtaError) as exc:
                    c.sign_tuf_targets(other)
                assert exc.value.code == ErrorCode.POLICY
            auth = {"Authorization": f"Bearer {s.tokens['ci']}"}
            tuf_url = f"{url}/v1/sign-tuf-targets"
            for payload, code in (
                ({"req": req}, "E_MALFORMED"),
                ({"request": req, "previous_b64": "***"}, "E_MALFORMED"),
                ({"request": req, "previous_b64": 7}, "E_MALFORMED"),
                ({"request": {**req, "image_size": "big"}}, "E_MALFORMED"),
            ):
                r = httpx.post(tuf_url, json=payload, headers=auth, timeout=10)
                assert r.status_code == 400 and r.json()["error"] == code, (payload, r.text)
            viewer = {"Authorization": f"Bearer {s.tokens['viewer']}"}
            r = httpx.post(tuf_url, json={"request": req}, headers=viewer, timeout=10)
            assert r.status_code == 403 and r.json()["error"] == "E_FORBIDDEN"
            r = httpx.post(tuf_url, json={"request": req}, timeout=10)
            assert r.status_code == 401 and r.json()["error"] == "E_AUTH"
    finally:
        s.service.close()
    ops = [rec for rec in read_records(s.log_path) if rec.op == "sign-tuf-targets"]
    assert len(ops) == 1 and ops[0].actor == "ci" and ops[0].hash == head.hash
    assert ops[0].subject["targets_sha256"] == hashlib.sha256(data).hexdigest()
