"""Co-signing (two-person rule) in the signing service: HTTP over loopback, officers' keys in
SoftHSM2, every refusal with its code and status, and the requester's CLI flow."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cbor2
import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from otaguard.cli.main import main
from otaguard.crypto.cose import Signer
from otaguard.crypto.keys import PublicKey
from otaguard.crypto.pkcs11 import Pkcs11Signer, generate_keypair
from otaguard.crypto.software import SoftwareSigner
from otaguard.errors import ErrorCode, FormatError, OtaError
from otaguard.manifest.verify import verify_envelope
from otaguard.signing.audit import AuditLog, read_records
from otaguard.signing.client import SigningClient
from otaguard.signing.config import ServiceConfig
from otaguard.signing.cosign import CosignConfig, CosignService
from otaguard.signing.http import SignRate, TokenTable, create_app, hash_token, new_token
from otaguard.signing.policy import Grant, Policy, Role, SigningRequest
from otaguard.signing.service import SigningService
from otaguard.signing.state import SigningState
from otaguard.trust.model import StaticKeys

from .conftest import SoftHsmToken
from .test_signing_http import body, run_server

T0 = 1_900_000_000
ROLES = {
    "ci": Role.RELEASE,
    "alice": Role.SECURITY_OFFICER,
    "bob": Role.SECURITY_OFFICER,
    "carol": Role.SECURITY_OFFICER,
    "viewer": Role.VIEWER,
}


class Clock:
    def __init__(self) -> None:
        self.t = float(T0)

    def __call__(self) -> float:
        return self.t


class Cosigning:
    """A signing service with officers alice, bob (HSM keys) and carol (grant for another
    vendor); threshold 2, four-eyes on, requests lapse after one hour."""

    def __init__(self, tmp: Path, officer_keys: dict[str, Signer], *, threshold: int = 2) -> None:
        self.clock = Clock()
        self.tokens = {rid: new_token() for rid in ROLES}
        table = TokenTable.from_config(
            [
                {"sha256": hash_token(t), "requester": rid, "role": ROLES[rid].value}
                for rid, t in self.tokens.items()
            ]
        )
        policy = Policy(
            grants={
                "ci": (Grant("example.com", "thermo"),),
                "alice": (Grant("example.com"),),
                "bob": (Grant("example.com"),),
                "carol": (Grant("other.example"),),
            }
        )
        self.seal = SoftwareSigner(ed25519.Ed25519PrivateKey.generate())
        self.log_path = tmp / "audit.log"
        log = AuditLog.open(self.log_path, self.seal, seal_every=4)
        self.service = SigningService(
            self.seal, policy, log, SigningState(tmp / "st.sqlite"), clock=self.clock
        )
        self.officer_keys = officer_keys
        self.cosign = CosignService(
            self.service, officer_keys, CosignConfig(threshold, ttl=3600, four_eyes=True)
        )
        self.app = create_app(
            self.service,
            table,
            sign_rate=SignRate(per_minute=6000, burst=1000),
            clock=self.clock,
            cosign=self.cosign,
        )

    def client(self, url: str, who: str) -> SigningClient:
        return SigningClient(url, self.tokens[who])

    def ops(self) -> list[str]:
        return [r.op for r in read_records(self.log_path)]


def req(**kw: Any) -> SigningRequest:
    return SigningRequest.from_dict(body(expires=T0 + 86400, **kw))


def code_of(fn: Any, *args: Any) -> ErrorCode:
    with pytest.raises(OtaError) as ei:
        fn(*args)
    return ei.value.code


def hsm_officers(t: SoftHsmToken) -> dict[str, Signer]:
    out: dict[str, Signer] = {}
    for name in ("alice", "bob"):
        generate_keypair(t.uri(), f"officer-{name}", "ed25519", pin=t.pin, module=t.module)
        out[name] = Pkcs11Signer.open(t.uri(f"officer-{name}"), pin=t.pin, module=t.module)
    out["carol"] = SoftwareSigner(ed25519.Ed25519PrivateKey.generate())
    return out


@pytest.fixture
def cs(tmp_path: Path, softhsm_token: SoftHsmToken) -> Iterator[tuple[Cosigning, str]]:
    officers = hsm_officers(softhsm_token)
    c = Cosigning(tmp_path, officers)
    with run_server(c.app) as url:
        yield c, url
    c.service.close()
    for s in officers.values():
        close = getattr(s, "close", None)
        if callable(close):
            close()


def test_release_waits_for_two_distinct_officers(cs: tuple[Cosigning, str]) -> None:
    c, url = cs
    ci, alice, bob = c.client(url, "ci"), c.client(url, "alice"), c.client(url, "bob")
    carol, viewer = c.client(url, "carol"), c.client(url, "viewer")
    view = ci.cosign_create([req()])
    rid, digest = view["id"], view["request_digest"]
    assert view["status"] == "pending" and view["approvals"] == [] and view["envelopes"] == []
    assert code_of(viewer.cosign_get, rid) == ErrorCode.FORBIDDEN  # not requester nor officer

    # an approval names exactly the manifests it signs
    assert code_of(alice.cosign_approve, rid, "00" * 32) == ErrorCode.REQUEST_CHANGED
    one = alice.cosign_approve(rid, digest)
    assert one["status"] == "pending" and [a["officer"] for a in one["approvals"]] == ["alice"]
    assert one["envelopes"] == []  # nothing leaves before k approvals
    assert code_of(alice.cosign_approve, rid, digest) == ErrorCode.DUPLICATE_SIGNER
    assert code_of(carol.cosign_approve, rid, digest) == ErrorCode.POLICY  # other vendor
    assert code_of(ci.cosign_approve, rid, digest) == ErrorCode.FORBIDDEN  # no officer key
    assert code_of(viewer.cosign_approve, rid, digest) == ErrorCode.FORBIDDEN
    assert ci.cosign_get(rid)["status"] == "pending"

    done = bob.cosign_approve(rid, digest)
    assert done["status"] == "complete"
    env = base64.b64decode(ci.cosign_get(rid)["envelopes"][0])
    keys = [c.officer_keys[n].public_key for n in ("alice", "bob")]
    vm = verify_envelope(env, StaticKeys(keys, 2), now=T0)
    assert sorted(k.key_id for k in vm.signers) == sorted(k.key_id for k in keys)
    assert vm.info.sequence_number == view["sequence"]
    with pytest.raises(OtaError) as ei:  # either key alone is not enough
        verify_envelope(env, StaticKeys(keys[:1], 2), now=T0)
    assert ei.value.code == ErrorCode.THRESHOLD
    assert code_of(alice.cosign_approve, rid, digest) == ErrorCode.CONFLICT  # already complete

    # each approval and every refusal of an officer is audited, then the signature itself
    recs = list(read_records(c.log_path))
    approvals = [r for r in recs if r.op == "cosign-approve"]
    assert [(r.actor, r.subject["request_digest"]) for r in approvals] == [
        ("alice", digest),
        ("bob", digest),
    ]
    refused = [r.subject["error"] for r in recs if r.op == "cosign-refused"]
    assert refused == ["E_REQUEST_CHANGED", "E_DUPLICATE_SIGNER", "E_POLICY", "E_FORBIDDEN",
                       "E_FORBIDDEN", "E_CONFLICT"]  # fmt: skip
    signed = [r for r in recs if r.op == "sign-manifest"]
    assert len(signed) == 1 and signed[0].subject["approvers"] == ["alice", "bob"]
    assert signed[0].subject["key_ids"] == [k.key_id.hex() for k in keys]
    # the release moved the floors like any other: the same version again is a downgrade
    assert code_of(ci.cosign_create, [req()]) == ErrorCode.DOWNGRADE


def test_http_statuses_are_typed(cs: tuple[Cosigning, str]) -> None:
    c, url = cs
    view = c.client(url, "ci").cosign_create([req()])
    rid = view["id"]

    def approve(who: str, payload: Any, rid: str = rid) -> httpx.Response:
        return httpx.post(
            f"{url}/v1/cosign/{rid}/approve",
            json=payload,
            headers={"Authorization": f"Bearer {c.tokens[who]}"},
            timeout=10,
        )

    r = approve("alice", {"request_digest": "00" * 32})
    assert (r.status_code, r.json()["error"]) == (409, "E_REQUEST_CHANGED")
    r = approve("alice", {"request_digest": "zz"})
    assert (r.status_code, r.json()["error"]) == (400, "E_MALFORMED")
    r = approve("alice", {"request_digest": "00" * 32}, rid="cs_" + "0" * 24)
    assert (r.status_code, r.json()["error"]) == (404, "E_NOT_FOUND")
    r = approve("ci", {"request_digest": view["request_digest"]})
    assert (r.status_code, r.json()["error"]) == (403, "E_FORBIDDEN")
    r = approve("alice", {"request_digest": view["request_digest"]})
    assert r.status_code == 200
    r = approve("alice", {"request_digest": view["request_digest"]})
    assert (r.status_code, r.json()["error"]) == (409, "E_DUPLICATE_SIGNER")
    r = httpx.post(f"{url}/v1/cosign", json={"requests": []},
                   headers={"Authorization": f"Bearer {c.tokens['ci']}"}, timeout=10)  # fmt: skip
    assert (r.status_code, r.json()["error"]) == (400, "E_MALFORMED")
    r = httpx.get(f"{url}/v1/cosign/{rid}", timeout=10)
    assert (r.status_code, r.json()["error"]) == (401, "E_AUTH")


def test_four_eyes_and_expiry(cs: tuple[Cosigning, str]) -> None:
    c, url = cs
    bob, alice = c.client(url, "bob"), c.client(url, "alice")
    own = bob.cosign_create([req()])
    assert code_of(bob.cosign_approve, own["id"], own["request_digest"]) == ErrorCode.FOUR_EYES
    alice.cosign_approve(own["id"], own["request_digest"])
    c.clock.t += 3601  # past the request's hour
    assert code_of(c.client(url, "carol").cosign_approve, own["id"], own["request_digest"]) == (
        ErrorCode.REQUEST_EXPIRED
    )
    r = httpx.post(f"{url}/v1/cosign/{own['id']}/approve",
                   json={"request_digest": own["request_digest"]},
                   headers={"Authorization": f"Bearer {c.tokens['alice']}"},
                   timeout=10)  # fmt: skip
    assert (r.status_code, r.json()["error"]) == (410, "E_REQUEST_EXPIRED")
    assert bob.cosign_get(own["id"])["status"] == "expired"
    assert "sign-manifest" not in c.ops()


def test_a_request_overtaken_by_a_later_release_fails_at_completion(
    cs: tuple[Cosigning, str],
) -> None:
    c, url = cs
    ci, alice, bob = c.client(url, "ci"), c.client(url, "alice"), c.client(url, "bob")
    old = ci.cosign_create([req(version="1.0.0")])
    new = ci.cosign_create([req(version="1.1.0", image_digest="cd" * 32)])
    for o in (alice, bob):
        o.cosign_approve(new["id"], new["request_digest"])
    alice.cosign_approve(old["id"], old["request_digest"])
    last = bob.cosign_approve(old["id"], old["request_digest"])
    assert (last["status"], last["error"], last["envelopes"]) == ("failed", "E_DOWNGRADE", [])


def test_service_refuses_officers_sharing_a_key(tmp_path: Path) -> None:
    k = SoftwareSigner(ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(OtaError) as ei:
        Cosigning(tmp_path, {"alice": k, "bob": k})
    assert ei.value.code == ErrorCode.DUPLICATE_SIGNER
    with pytest.raises(OtaError) as ei:
        Cosigning(tmp_path / "x", {"alice": k}, threshold=2)
    assert ei.value.code == ErrorCode.THRESHOLD


def test_config_cosign_section(tmp_path: Path) -> None:
    (tmp_path / "policy.json").write_text('{"version": 1, "requesters": {}}')
    base: dict[str, Any] = {
        "version": 1,
        "signer": {"key_file": "k.key"},
        "audit_sealer": {"key_file": "audit.key"},
        "audit_log": "a.log",
        "state": "s.sqlite",
        "policy": "policy.json",
        "tokens": [
            {"sha256": "ab" * 32, "requester": n, "role": "security-officer"}
            for n in ("alice", "bob")
        ],
    }
    officers = {"alice": {"key_file": "alice.key"}, "bob": {"pkcs11_uri": "pkcs11:token=t"}}

    def load(cosign: Any) -> ServiceConfig:
        p = tmp_path / "c.json"
        p.write_text(json.dumps({**base, "cosign": cosign}))
        return ServiceConfig.load(p)

    cfg = load({"threshold": 2, "officers": officers})
    assert cfg.cosign is not None and cfg.cosign.threshold == 2 and cfg.cosign.four_eyes
    assert cfg.officers["alice"].key_file == tmp_path / "alice.key"
    for bad in (
        {"threshold": 3, "officers": officers},  # more than the officers
        {"threshold": 2, "officers": {**officers, "mallory": {"key_file": "m.key"}}},  # no token
        {"threshold": 2, "officers": {"alice": {}, "bob": officers["bob"]}},  # no key
        {"threshold": 2, "officers": officers, "ttl_hours": 0},
        {"threshold": "2", "officers": officers},
        {"threshold": 2, "officers": officers, "extra": 1},
    ):
        with pytest.raises(FormatError) as ei:
            load(bad)
        assert ei.value.code == ErrorCode.MALFORMED, bad


def test_not_configured_is_404(tmp_path: Path) -> None:
    seal = SoftwareSigner(ed25519.Ed25519PrivateKey.generate())
    svc = SigningService(
        seal,
        Policy(grants={}),
        AuditLog.open(tmp_path / "a.log", seal),
        SigningState(tmp_path / "s.sqlite"),
    )
    tok = new_token()
    app = create_app(svc, TokenTable.from_config(
        [{"sha256": hash_token(tok), "requester": "ci", "role": "release"}]))  # fmt: skip
    with run_server(app) as url:
        r = httpx.get(f"{url}/v1/cosign/cs_x", headers={"Authorization": f"Bearer {tok}"})
    assert (r.status_code, r.json()["error"]) == (404, "E_NOT_FOUND")
    svc.close()


# --- the CLI: requester files and resumes, officers show and approve --------------------------
def run(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    rc = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_cosign_flow_with_deltas(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    officers: dict[str, Signer] = {
        n: SoftwareSigner(ed25519.Ed25519PrivateKey.generate()) for n in ("alice", "bob", "carol")
    }
    (tmp_path / "svc").mkdir()
    c = Cosigning(tmp_path / "svc", officers)
    c.clock.t = time.time()  # the CLI checks expiry against the real clock
    v1 = os.urandom(30_000)
    v2 = bytearray(v1)
    v2[100:200] = os.urandom(100)
    (tmp_path / "v1.bin").write_bytes(v1)
    (tmp_path / "v2.bin").write_bytes(bytes(v2))
    common = ["--vendor", "example.com", "--model", "thermo", "--hw-rev", "A",
              "--security-counter", "1", "--expires", "+2d"]  # fmt: skip
    with run_server(c.app) as url:
        # 1.0.0 first (the delta base), co-signed as well
        def cosigned(version: str, image: Path, out: Path, *extra: str | Path) -> dict[str, Any]:
            monkeypatch.setenv("OTAGUARD_SIGNING_TOKEN", c.tokens["ci"])
            rc, _, err = run(capsys, "release", "create", "--image", image, "--version", version,
                             *common, "--signing-url", url, "--cosign", "--wait", "0",
                             "--out", out, *extra)  # fmt: skip
            assert rc == 1 and "E_PENDING" in err and not out.exists(), err
            rid = re.search(r"co-signing request (cs_[0-9a-f]+) filed", err)
            assert rid is not None
            for officer in ("alice", "bob"):
                monkeypatch.setenv("OTAGUARD_SIGNING_TOKEN", c.tokens[officer])
                rc, shown, err = run(capsys, "signing", "show", rid[1], "--signing-url", url)
                assert rc == 0 and "pending" in shown and version in shown, err
                digest = re.search(r"digest\s+([0-9a-f]{64})", shown)
                assert digest is not None
                rc, _, err = run(capsys, "signing", "approve", rid[1], "--signing-url", url,
                                 "--digest", digest[1], "--json")  # fmt: skip
                assert rc == 0, err
            monkeypatch.setenv("OTAGUARD_SIGNING_TOKEN", c.tokens["ci"])
            rc, out_json, err = run(capsys, "release", "create", "--image", image, "--version",
                                    version, *common, "--signing-url", url, "--cosign-id", rid[1],
                                    "--out", out, "--json", *extra)  # fmt: skip
            assert rc == 0, err
            summary: dict[str, Any] = json.loads(out_json)
            return summary

        cosigned("1.0.0", tmp_path / "v1.bin", tmp_path / "rel1")
        s2 = cosigned("1.1.0", tmp_path / "v2.bin", tmp_path / "rel2",
                      "--delta-from", tmp_path / "rel1")  # fmt: skip
        # an officer who names another digest than the request holds is refused locally
        monkeypatch.setenv("OTAGUARD_SIGNING_TOKEN", c.tokens["ci"])
        rc, _, err = run(capsys, "release", "create", "--image", tmp_path / "v2.bin", "--version",
                         "1.2.0", *common, "--signing-url", url, "--cosign", "--wait", "0",
                         "--out", tmp_path / "rel3")  # fmt: skip
        rid3 = re.search(r"(cs_[0-9a-f]+)", err)
        assert rid3 is not None
        monkeypatch.setenv("OTAGUARD_SIGNING_TOKEN", c.tokens["carol"])
        rc, _, err = run(capsys, "signing", "approve", rid3[1], "--signing-url", url,
                         "--digest", "ab" * 32)  # fmt: skip
        assert rc == 1 and "E_REQUEST_CHANGED" in err
        # resuming with another image is refused
        monkeypatch.setenv("OTAGUARD_SIGNING_TOKEN", c.tokens["ci"])
        rc, _, err = run(capsys, "release", "create", "--image", tmp_path / "v1.bin", "--version",
                         "1.2.0", *common, "--signing-url", url, "--cosign-id", rid3[1],
                         "--out", tmp_path / "rel3")  # fmt: skip
        assert rc == 1 and "E_REQUEST_CHANGED" in err
    keys = StaticKeys([officers["alice"].public_key, officers["bob"].public_key], 2)
    assert len(s2["signer_key_ids"]) == 2 and len(s2["deltas"]) == 1
    for name in ("manifest.suit", s2["deltas"][0]["manifest"]["file"]):
        envelope = (tmp_path / "rel2" / name).read_bytes()
        assert len(cbor2.loads(cbor2.loads(envelope).value[2])) == 3  # digest + 2 signatures
        verify_envelope(envelope, keys)
    c.service.close()


def test_signing_serve_with_officer_keys_in_the_hsm(
    tmp_path: Path,
    softhsm_token: SoftHsmToken,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`signing serve` as a real process with a cosign section: the officers' keys are in
    SoftHSM2 (PIN from the environment), CI files, two officers approve, CI picks it up."""
    t = softhsm_token
    pubs = []
    for name in ("alice", "bob"):
        pk = generate_keypair(t.uri(), f"officer-{name}", "ed25519", pin=t.pin, module=t.module)
        pubs.append(tmp_path / f"{name}.pub")
        pubs[-1].write_bytes(pk.to_pem())
    SoftwareSigner.generate(tmp_path / "release.key", "ed25519", b"correct horse battery")
    SoftwareSigner.generate(tmp_path / "seal.key", "ed25519", b"correct horse battery")
    tokens = {n: new_token() for n in ("ci", "alice", "bob")}
    role = {"ci": "release", "alice": "security-officer", "bob": "security-officer"}
    grants = {n: [{"vendor": "example.com"}] for n in tokens}
    (tmp_path / "policy.json").write_text(json.dumps({"version": 1, "requesters": grants}))
    (tmp_path / "signing.json").write_text(json.dumps({
        "version": 1, "signer": {"key_file": "release.key"},
        "audit_sealer": {"key_file": "seal.key"}, "audit_log": "audit.log",
        "state": "state.sqlite", "policy": "policy.json",
        "tokens": [{"sha256": hash_token(tok), "requester": n, "role": role[n]}
                   for n, tok in tokens.items()],
        "cosign": {"threshold": 2, "officers": {
            n: {"pkcs11_uri": t.uri(f"officer-{n}"), "pkcs11_module": t.module}
            for n in ("alice", "bob")}},
    }))  # fmt: skip
    env = {**t.env(), "OTAGUARD_KEY_PASSPHRASE": "correct horse battery",
           "OTAGUARD_PKCS11_PIN": t.pin}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "otaguard.cli.main", "signing", "serve",
         "--config", tmp_path / "signing.json", "--port", "0"],
        stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        url = None
        deadline = time.monotonic() + 30
        while url is None and time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            m = re.search(r"listening on (http://\S+)", line)
            url = m.group(1) if m else None
        assert url, "service did not start"
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        img = tmp_path / "fw.bin"
        img.write_bytes(os.urandom(5000))
        args: list[str | Path] = [
            "release", "create", "--image", img, "--vendor", "example.com", "--model", "thermo",
            "--hw-rev", "A", "--version", "1.0.0", "--security-counter", "0", "--expires", "+2d",
            "--signing-url", url, "--out", tmp_path / "rel", "--trust-key", pubs[0],
            "--trust-key", pubs[1],
        ]  # fmt: skip
        monkeypatch.setenv("OTAGUARD_SIGNING_TOKEN", tokens["ci"])
        rc, _, err = run(capsys, *args, "--cosign", "--wait", "0")
        found = re.search(r"(cs_[0-9a-f]+)", err)
        assert rc == 1 and "E_PENDING" in err and found is not None
        for n in ("alice", "bob"):
            monkeypatch.setenv("OTAGUARD_SIGNING_TOKEN", tokens[n])
            rc, out, err = run(capsys, "signing", "approve", found[1], "--signing-url", url,
                               "--json")  # fmt: skip
            assert rc == 0, err
        assert json.loads(out)["status"] == "complete"
        monkeypatch.setenv("OTAGUARD_SIGNING_TOKEN", tokens["ci"])
        rc, out, err = run(capsys, *args, "--cosign-id", found[1], "--json")
        assert rc == 0, err
    finally:
        proc.terminate()
        proc.wait(20)
    summary = json.loads(out)
    keys = [PublicKey.from_pem(p.read_bytes()) for p in pubs]
    assert sorted(summary["signer_key_ids"]) == sorted(k.key_id.hex() for k in keys)
    verify_envelope((tmp_path / "rel" / "manifest.suit").read_bytes(), StaticKeys(keys, 2))
    rc, out, _ = run(capsys, "audit", "show", tmp_path / "audit.log", "--json")
    ops = [r["op"] for r in json.loads(out)["records"]]
    assert ops.count("cosign-approve") == 2 and ops.count("sign-manifest") == 1
