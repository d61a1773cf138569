"""The HTTP signing service over a real loopback socket (uvicorn in a thread)."""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import ipaddress
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import NameOID
from starlette.applications import Starlette

from otaguard.crypto.software import SoftwareSigner
from otaguard.errors import ErrorCode, OtaError
from otaguard.manifest.verify import verify_envelope
from otaguard.signing.audit import AuditLog, read_records
from otaguard.signing.client import SigningClient
from otaguard.signing.http import SignRate, TokenTable, create_app, hash_token, new_token
from otaguard.signing.policy import Grant, Policy, Role, SigningRequest
from otaguard.signing.service import SigningService
from otaguard.signing.state import SigningState
from otaguard.trust.model import StaticKeys


@contextlib.contextmanager
def run_server(
    app: Starlette, *, certfile: Path | None = None, keyfile: Path | None = None
) -> Iterator[str]:
    """Serve ``app`` on 127.0.0.1:<free port> in a thread; yield the base URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        log_level="warning",
        lifespan="off",
        ssl_certfile=str(certfile) if certfile else None,
        ssl_keyfile=str(keyfile) if keyfile else None,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"{'https' if certfile else 'http'}://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


# The module-scoped fixture signs more than the default burst in quick succession; the rate
# limit itself is tested in test_signing_tokens.py with an injected clock.
GENEROUS = SignRate(per_minute=6000, burst=1000)


class Service:
    def __init__(
        self,
        tmp: Path,
        *,
        sign_rate: SignRate = GENEROUS,
        not_after: dict[str, str] | None = None,
        clock: Callable[[], float] = time.time,
        rate_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.signer = SoftwareSigner(ed25519.Ed25519PrivateKey.generate())
        self.tokens = {
            "ci": new_token(),
            "officer": new_token(),
            "viewer": new_token(),
            "outsider": new_token(),
        }
        roles = {
            "ci": Role.RELEASE,
            "officer": Role.SECURITY_OFFICER,
            "viewer": Role.VIEWER,
            "outsider": Role.RELEASE,
        }
        entries: list[dict[str, str]] = [
            {"sha256": hash_token(tok), "requester": rid, "role": roles[rid].value}
            for rid, tok in self.tokens.items()
        ]
        for e in entries:
            if not_after and e["requester"] in not_after:
                e["not_after"] = not_after[e["requester"]]
        table = TokenTable.from_config(entries)
        policy = Policy(
            grants={"ci": (Grant("example.com", "thermo"),), "officer": (Grant("example.com"),)}
        )
        self.log_path = tmp / "audit.log"
        self.state_path = tmp / "st.sqlite"
        # seals come from a key of their own, as `signing serve` requires
        self.sealer = SoftwareSigner(ed25519.Ed25519PrivateKey.generate())
        log = AuditLog.open(self.log_path, self.sealer, seal_every=2)
        self.service = SigningService(self.signer, policy, log, SigningState(self.state_path))
        self.app = create_app(
            self.service,
            table,
            max_body=4096,
            sign_rate=sign_rate,
            clock=clock,
            rate_clock=rate_clock,
        )


def body(**kw: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "image_digest": "ab" * 32,
        "digest_alg": "sha256",
        "image_size": 1234,
        "vendor": "example.com",
        "model": "thermo",
        "hw_rev": "A",
        "version": "1.0.0",
        "min_version": None,
        "security_counter": 1,
        "expires": int(time.time()) + 86400,
        "uri": "https://u.example.com/fw.bin",
    }
    d.update(kw)
    return d


@pytest.fixture(scope="module")
def svc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, str]]:
    s = Service(tmp_path_factory.mktemp("signing-http"))
    with run_server(s.app) as url:
        yield s, url
    s.service.close()


def post(url: str, token: str | None, payload: Any, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    return httpx.post(f"{url}/v1/sign", json=payload, headers=headers, timeout=10, **kw)


def test_good_token_signs(svc: tuple[Service, str]) -> None:
    s, url = svc
    r = post(url, s.tokens["ci"], body(version="1.0.0"))
    assert r.status_code == 200, r.text
    out = r.json()
    env = base64.b64decode(out["envelope"])
    vm = verify_envelope(env, StaticKeys([s.signer.public_key]))
    assert vm.info.version == "1.0.0" and vm.info.sequence_number == out["sequence"]
    assert vm.info.image_digest == bytes.fromhex("ab" * 32)
    assert out["key_ids"] == [s.signer.public_key.key_id.hex()]
    rec = list(read_records(s.log_path))[out["audit"]["seq"]]
    assert rec.actor == "ci" and rec.op == "sign-manifest" and rec.hash == out["audit"]["hash"]


def test_missing_and_bad_token(svc: tuple[Service, str]) -> None:
    s, url = svc
    for tok in (None, "otg_wrong", s.tokens["ci"] + "x", s.tokens["viewer"][:-1]):
        r = post(url, tok, body())
        assert r.status_code == 401, (tok, r.text)
        assert r.json()["error"] == "E_AUTH"
        assert r.headers["www-authenticate"].startswith("Bearer")
    r = httpx.post(
        f"{url}/v1/sign", json=body(), headers={"Authorization": f"Basic {s.tokens['ci']}"}
    )
    assert r.status_code == 401


def test_role_without_permission(svc: tuple[Service, str]) -> None:
    s, url = svc
    r = post(url, s.tokens["viewer"], body())
    assert r.status_code == 403 and r.json()["error"] == "E_FORBIDDEN"
    r = post(url, s.tokens["ci"], body(downgrade=True))
    assert r.status_code == 403 and r.json()["error"] == "E_FORBIDDEN"
    # authenticated, signing role, but no policy grant for this model
    r = post(url, s.tokens["outsider"], body())
    assert r.status_code == 403 and r.json()["error"] == "E_POLICY"
    r = post(url, s.tokens["ci"], body(model="gateway"))
    assert r.status_code == 403 and r.json()["error"] == "E_POLICY"


def test_oversized_body(svc: tuple[Service, str]) -> None:
    s, url = svc
    big = body(description="x" * 5000)
    r = post(url, s.tokens["ci"], big)
    assert r.status_code == 413 and r.json()["error"] == "E_TOO_LARGE"

    def chunks() -> Iterator[bytes]:  # no Content-Length: the streaming limit must hold
        for _ in range(10):
            yield b" " * 1000

    r = httpx.post(
        f"{url}/v1/sign",
        content=chunks(),
        headers={"Authorization": f"Bearer {s.tokens['ci']}", "Content-Type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error"] == "E_TOO_LARGE"


def test_malformed_requests(svc: tuple[Service, str]) -> None:
    s, url = svc
    auth = {"Authorization": f"Bearer {s.tokens['ci']}", "Content-Type": "application/json"}
    r = httpx.post(f"{url}/v1/sign", content=b"{not json", headers=auth)
    assert r.status_code == 400 and r.json()["error"] == "E_MALFORMED"
    r = post(url, s.tokens["ci"], body(image_size="big"))
    assert r.status_code == 400 and r.json()["error"] == "E_MALFORMED"
    r = httpx.post(
        f"{url}/v1/sign",
        content=b"{}",
        headers={"Authorization": auth["Authorization"], "Content-Type": "text/plain"},
    )
    assert r.status_code == 415
    r = httpx.get(f"{url}/v1/nothing")
    assert r.status_code == 404 and r.json()["error"] == "E_NOT_FOUND"


def test_downgrade_and_counter_conflicts(svc: tuple[Service, str]) -> None:
    s, url = svc
    ok = post(url, s.tokens["officer"], body(model="gw", version="5.0.0", security_counter=9))
    assert ok.status_code == 200, ok.text
    r = post(url, s.tokens["officer"], body(model="gw", version="4.0.0", security_counter=9))
    assert r.status_code == 409 and r.json()["error"] == "E_DOWNGRADE"
    r = post(url, s.tokens["officer"], body(model="gw", version="6.0.0", security_counter=8))
    assert r.status_code == 409 and r.json()["error"] == "E_SECURITY_COUNTER"
    r = post(
        url,
        s.tokens["officer"],
        body(model="gw", version="4.0.0", security_counter=9, downgrade=True),
    )
    assert r.status_code == 200, r.text


def test_client_maps_errors_and_signs(svc: tuple[Service, str]) -> None:
    s, url = svc
    req = SigningRequest.from_dict(body(model="thermo", version="2.0.0", security_counter=2))
    with SigningClient(url, s.tokens["ci"]) as c:
        assert c.public_key() == s.signer.public_key
        res = c.sign(req)
        vm = verify_envelope(res.envelope, StaticKeys([s.signer.public_key]))
        assert vm.info.version == "2.0.0" and res.sequence == vm.info.sequence_number
        with pytest.raises(OtaError) as ei:
            c.sign(req)  # same version again
        assert ei.value.code == ErrorCode.DOWNGRADE
    with SigningClient(url, "otg_bogus") as c, pytest.raises(OtaError) as ei:
        c.sign(req)
    assert ei.value.code == ErrorCode.AUTH
    with pytest.raises(OtaError) as ei:
        SigningClient(url, "")
    assert ei.value.code == ErrorCode.AUTH
    with (
        SigningClient("http://127.0.0.1:1", "otg_x", timeout=2) as c,
        pytest.raises(OtaError) as ei,
    ):
        c.sign(req)
    assert ei.value.code == ErrorCode.TRANSPORT


def test_token_table_config_errors() -> None:
    for bad in [
        None,
        [{"sha256": "00" * 32, "requester": "x"}],
        [{"sha256": "00" * 31, "requester": "x", "role": "release"}],
        [{"sha256": "00" * 32, "requester": "x", "role": "root"}],
        [{"sha256": "zz" * 32, "requester": "x", "role": "release"}],
    ]:
        with pytest.raises(OtaError) as ei:
            TokenTable.from_config(bad)
        assert ei.value.code == ErrorCode.MALFORMED


def _self_signed(tmp: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "otaguard test signing")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    certfile, keyfile = tmp / "cert.pem", tmp / "key.pem"
    certfile.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    keyfile.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return certfile, keyfile


def test_tls(tmp_path: Path) -> None:
    s = Service(tmp_path)
    certfile, keyfile = _self_signed(tmp_path)
    with run_server(s.app, certfile=certfile, keyfile=keyfile) as url:
        assert url.startswith("https://")
        req = SigningRequest.from_dict(body())
        with SigningClient(url, s.tokens["ci"], ca_file=certfile) as c:
            res = c.sign(req)
        verify_envelope(res.envelope, StaticKeys([s.signer.public_key]))
        # without the pinned CA the system trust store does not know this server
        with SigningClient(url, s.tokens["ci"]) as c, pytest.raises(OtaError) as ei:
            c.sign(req)
        assert ei.value.code == ErrorCode.TRANSPORT
    s.service.close()
    assert json.loads(s.log_path.read_bytes().splitlines()[-1])["op"] == "seal"


def test_fast_forward_is_a_conflict_not_a_server_error(svc: tuple[Service, str]) -> None:
    """Regression: E_FAST_FORWARD was answered with HTTP 500."""
    from otaguard.signing.policy import MAX_SECURITY_COUNTER

    s, url = svc
    r = post(url, s.tokens["officer"], body(model="gw", security_counter=MAX_SECURITY_COUNTER + 1))
    assert r.status_code == 409 and r.json()["error"] == "E_FAST_FORWARD", r.text


def test_only_internal_errors_are_server_errors() -> None:
    from otaguard.signing.http import status_of

    for code in ErrorCode:
        st = status_of(code)
        if code == ErrorCode.INTERNAL:
            assert st == 500
        else:
            assert st < 500 or st == 503, (code, st)  # 503: the HSM/audit/DB is unavailable


def test_failed_authentication_is_logged_on_every_route(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Regression: the co-signing routes used to check tokens without logging a failure, so
    token guessing there left no trace. Every authenticated route logs it now; and a throttled
    signer still gets Retry-After through the shared admission check."""
    routes = [
        ("POST", "/v1/sign"), ("POST", "/v1/sign-mcuboot"), ("POST", "/v1/sign-tuf-targets"),
        ("GET", "/v1/public-key"), ("POST", "/v1/cosign"), ("GET", "/v1/cosign/cs_x"),
        ("POST", "/v1/cosign/cs_x/approve"),
    ]  # fmt: skip
    for i, (method, path) in enumerate(routes):
        s = Service(tmp_path / str(i))  # a fresh service: the log is rate limited per source
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="otaguard.auth"), run_server(s.app) as url:
            r = httpx.request(
                method, url + path, json={}, headers={"Authorization": "Bearer otg_wrong"}
            )
        assert r.status_code == 401 and r.json()["error"] == "E_AUTH", (path, r.text)
        lines = [rec.getMessage() for rec in caplog.records]
        assert any("authentication failed on the signing listener" in m for m in lines), path
        s.service.close()
    s = Service(tmp_path / "rate", sign_rate=SignRate(per_minute=1, burst=1))
    with run_server(s.app) as url:
        assert post(url, s.tokens["ci"], body()).status_code == 200
        r = post(url, s.tokens["ci"], body())
    assert r.status_code == 429 and r.json()["error"] == "E_RATE_LIMIT"
    assert int(r.headers["retry-after"]) >= 1
    s.service.close()
