"""G16: signing-service tokens expire (``not_after``) and ``POST /v1/sign`` is rate limited.

Real loopback HTTP (uvicorn in a thread, helpers from ``test_signing_http``); time comes from
an injected clock, so nothing sleeps.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otaguard.cli.main import main
from otaguard.errors import ErrorCode, OtaError
from otaguard.signing import http as signing_http
from otaguard.signing.audit import read_records
from otaguard.signing.client import SigningClient
from otaguard.signing.config import ServiceConfig
from otaguard.signing.http import (
    DEFAULT_SIGN_RATE,
    SignRate,
    TokenTable,
    format_utc,
    hash_token,
    new_token,
    parse_utc,
)
from otaguard.signing.policy import Role, SigningRequest
from tests.test_signing_http import Service, body, post, run_server

T0 = 1_800_000_000.0  # 2027-01-15T08:00:00Z


class FakeClock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def ops(path: Path) -> list[str]:
    return [r.op for r in read_records(path)]


class Versions:
    """Strictly rising versions, so every request is one the policy would accept."""

    def __init__(self) -> None:
        self.n = 0

    def next(self, **kw: Any) -> dict[str, Any]:
        self.n += 1
        return body(version=f"1.0.{self.n}", **kw)


# --- expiry -----------------------------------------------------------------------------------


def test_expired_token_is_refused_and_nothing_is_signed(tmp_path: Path) -> None:
    clock = FakeClock()
    s = Service(tmp_path, clock=clock, not_after={"ci": format_utc(T0 - 1)})
    v = Versions()
    with run_server(s.app) as url:
        before = s.log_path.read_bytes()
        r = post(url, s.tokens["ci"], v.next())
        assert r.status_code == 401, r.text
        assert r.json() == {"error": "E_AUTH", "detail": "token expired"}
        assert r.headers["www-authenticate"].startswith("Bearer")
        auth = {"Authorization": f"Bearer {s.tokens['ci']}"}
        r = httpx.get(f"{url}/v1/public-key", headers=auth, timeout=10)
        assert r.status_code == 401 and r.json()["detail"] == "token expired"
        with SigningClient(url, s.tokens["ci"]) as c, pytest.raises(OtaError) as ei:
            c.sign(SigningRequest.from_dict(v.next()))
        assert ei.value.code == ErrorCode.AUTH and "token expired" in ei.value.detail
        assert s.log_path.read_bytes() == before  # no sign record, no refusal record
        # an entry without not_after (an older config) keeps working
        r = post(url, s.tokens["officer"], v.next())
        assert r.status_code == 200, r.text
    s.service.close()
    assert ops(s.log_path).count("sign-manifest") == 1
    assert [r.actor for r in read_records(s.log_path) if r.op == "sign-manifest"] == ["officer"]


def test_token_valid_until_the_clock_passes_not_after(tmp_path: Path) -> None:
    clock = FakeClock()
    end = T0 + 3600
    s = Service(tmp_path, clock=clock, not_after={"ci": format_utc(end)})
    v = Versions()
    with run_server(s.app) as url:
        assert post(url, s.tokens["ci"], v.next()).status_code == 200
        clock.t = end  # not_after is the last instant accepted
        assert post(url, s.tokens["ci"], v.next()).status_code == 200
        signed = ops(s.log_path).count("sign-manifest")
        clock.t = end + 1
        r = post(url, s.tokens["ci"], v.next())
        assert r.status_code == 401 and r.json() == {"error": "E_AUTH", "detail": "token expired"}
        assert ops(s.log_path).count("sign-manifest") == signed == 2
        # a wrong token still reads "invalid token", whatever the clock says
        r = post(url, "otg_" + "A" * 43, v.next())
        assert r.status_code == 401 and r.json()["detail"] == "invalid token"
    s.service.close()


def test_unknown_and_expired_tokens_cost_one_full_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """The constant-time scan is kept: every entry is compared, matched or not, expired or not."""
    toks = [new_token() for _ in range(5)]
    table = TokenTable.from_config(
        [
            {
                "sha256": hash_token(t),
                "requester": f"r{i}",
                "role": "release",
                "not_after": format_utc(T0 + 10 * i),
            }
            for i, t in enumerate(toks)
        ]
    )
    calls = 0
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        nonlocal calls
        calls += 1
        return real(a, b)

    monkeypatch.setattr(signing_http.hmac, "compare_digest", counting)
    for tok, now, detail in [
        ("otg_unknown", T0, "invalid token"),
        (toks[0], T0 + 1, "token expired"),
        (toks[4], T0 + 41, "token expired"),
    ]:
        calls = 0
        with pytest.raises(OtaError) as ei:
            table.check(tok, now)
        assert ei.value.code == ErrorCode.AUTH and ei.value.detail == detail
        assert calls == len(toks)
    calls = 0
    who = table.check(toks[4], T0 + 40)
    assert (who.id, who.role, calls) == ("r4", Role.RELEASE, len(toks))
    assert table.authenticate(toks[4], T0 + 41) is None


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=0, max_value=253402300799))
def test_utc_round_trip(t: int) -> None:
    text = format_utc(t)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", text)
    assert parse_utc(text) == t
    assert parse_utc(text[:-1] + "+00:00") == t


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=30))
def test_parse_utc_only_accepts_the_one_form(text: str) -> None:
    try:
        t = parse_utc(text)
    except OtaError as err:
        assert err.code == ErrorCode.MALFORMED
    else:
        assert format_utc(t) == text.replace("+00:00", "Z")


# --- the token command ------------------------------------------------------------------------


def mint(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["signing", "token", "--requester", "ci", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_token_command_writes_not_after_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    for args, lifetime in [((), 90 * 86400), (("--valid-for", "12h"), 12 * 3600)]:
        before = time.time()
        rc, out, err = mint(capsys, *args)
        assert rc == 0, err
        entry = json.loads(out)
        assert set(entry) == {"sha256", "requester", "role", "not_after"}
        assert before + lifetime - 1 <= parse_utc(entry["not_after"]) <= time.time() + lifetime
        assert entry["not_after"] in err  # the operator is told when it runs out
        tok = re.search(r"(otg_\S+)", err)
        assert tok is not None
        table = TokenTable.from_config([entry])
        assert table.check(tok.group(1), before).id == "ci"
        with pytest.raises(OtaError) as ei:
            table.check(tok.group(1), before + lifetime + 2)
        assert ei.value.detail == "token expired"
    rc, out, err = mint(capsys, "--no-expiry")
    assert rc == 0, err
    entry = json.loads(out)
    assert set(entry) == {"sha256", "requester", "role"} and "never expires" in err
    assert TokenTable.from_config([entry]).entries[0].not_after is None


@pytest.mark.parametrize(
    "args",
    [
        ("--valid-for", "3w"),
        ("--valid-for", "90"),
        ("--valid-for", "0d"),
        ("--valid-for", "-1d"),
        ("--valid-for", "3651d"),
        ("--valid-for", ""),
        ("--valid-for", "1.5d"),
        ("--valid-for", "90d", "--no-expiry"),
    ],
)
def test_token_command_bad_lifetime(capsys: pytest.CaptureFixture[str], args: tuple[str]) -> None:
    rc, out, err = mint(capsys, *args)
    assert rc == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "E_USAGE" in lines[0], err
    assert "otg_" not in err  # no token is minted


# --- configuration ----------------------------------------------------------------------------


def write_config(tmp: Path, **over: Any) -> Path:
    (tmp / "policy.json").write_text(json.dumps({"version": 1, "requesters": {}}))
    cfg: dict[str, Any] = {
        "version": 1,
        "signer": {"key_file": "svc.key"},
        "audit_sealer": {"key_file": "seal.key"},
        "audit_log": "audit.log",
        "state": "state.sqlite",
        "policy": "policy.json",
        "tokens": [
            {
                "sha256": "00" * 32,
                "requester": "ci",
                "role": "release",
                "not_after": "2027-02-21T00:00:00Z",
            },
            {"sha256": "11" * 32, "requester": "old", "role": "release"},
        ],
    }
    cfg.update(over)
    p = tmp / "signing.json"
    p.write_text(json.dumps(cfg))
    return p


def test_config_reads_not_after_and_sign_rate(tmp_path: Path) -> None:
    cfg = ServiceConfig.load(write_config(tmp_path))
    assert [e.not_after for e in cfg.tokens.entries] == [parse_utc("2027-02-21T00:00:00Z"), None]
    assert cfg.tokens.entries[0].not_after == 1803168000
    assert cfg.sign_rate == DEFAULT_SIGN_RATE == SignRate(per_minute=30, burst=10)
    cfg = ServiceConfig.load(write_config(tmp_path, sign_rate={"per_minute": 2, "burst": 1}))
    assert cfg.sign_rate == SignRate(2.0, 1)
    assert cfg.sign_rate.limit().rate == pytest.approx(2 / 60)


@pytest.mark.parametrize(
    "not_after",
    [
        "2027-02-21",
        "2027-02-21T00:00:00",
        "2027-02-21T00:00:00+01:00",
        "2027-02-21T00:00:00.5Z",
        "2027-02-30T00:00:00Z",
        "2027-02-21T24:00:00Z",
        " 2027-02-21T00:00:00Z",
        "tomorrow",
        "",
        1803168000,
        None,
        ["2027-02-21T00:00:00Z"],
    ],
)
def test_config_with_malformed_not_after(tmp_path: Path, not_after: object) -> None:
    entry = {"sha256": "00" * 32, "requester": "ci", "role": "release", "not_after": not_after}
    with pytest.raises(OtaError) as ei:
        ServiceConfig.load(write_config(tmp_path, tokens=[entry]))
    assert ei.value.code == ErrorCode.MALFORMED
    assert "not_after" in ei.value.detail and "signing.json" in ei.value.detail


@pytest.mark.parametrize(
    "rate",
    [
        {"per_minute": 0},
        {"per_minute": -5},
        {"per_minute": float("inf")},
        {"per_minute": float("nan")},
        {"burst": 0},
        {"burst": 1.5},
        {"per_minute": True},
        {"per_minute": "30"},
        {"per_minute": 30, "burst": 10, "window": 1},
        "30/min",
        [30, 10],
    ],
)
def test_config_with_malformed_sign_rate(tmp_path: Path, rate: object) -> None:
    with pytest.raises(OtaError) as ei:
        ServiceConfig.load(write_config(tmp_path, sign_rate=rate))
    assert ei.value.code == ErrorCode.MALFORMED


def test_token_entry_with_unknown_key_is_malformed() -> None:
    with pytest.raises(OtaError) as ei:
        TokenTable.from_config(
            [{"sha256": "00" * 32, "requester": "x", "role": "release", "expires": 1}]
        )
    assert ei.value.code == ErrorCode.MALFORMED


# --- rate limit -------------------------------------------------------------------------------


def test_rate_limit_burst_then_429_until_the_clock_advances(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock()
    burst = 3
    s = Service(
        tmp_path, sign_rate=SignRate(per_minute=6, burst=burst), clock=clock, rate_clock=clock
    )
    v = Versions()
    with run_server(s.app) as url, caplog.at_level(logging.WARNING, "otaguard.signing.http"):
        for _ in range(burst):
            r = post(url, s.tokens["ci"], v.next())
            assert r.status_code == 200, r.text
        r = post(url, s.tokens["ci"], v.next())
        assert r.status_code == 429, r.text
        assert r.json()["error"] == "E_RATE_LIMIT"
        assert r.headers["retry-after"] == "10"  # 6 per minute: one token every 10 s
        assert ops(s.log_path).count("sign-manifest") == burst
        before = s.log_path.read_bytes()
        # refused before the policy (this one would be audited as sign-refused) and before
        # the body is read (this one would be 413)
        r = post(url, s.tokens["ci"], v.next(model="gateway"))
        assert r.status_code == 429 and r.json()["error"] == "E_RATE_LIMIT"
        r = post(url, s.tokens["ci"], v.next(description="x" * 5000))
        assert r.status_code == 429 and r.json()["error"] == "E_RATE_LIMIT"
        assert s.log_path.read_bytes() == before
        # another requester is not throttled by ci's bucket
        r = post(url, s.tokens["officer"], v.next(model="gw"))
        assert r.status_code == 200, r.text
        # time passes: exactly one token has come back
        clock.t += 10
        r = post(url, s.tokens["ci"], v.next())
        assert r.status_code == 200, r.text
        r = post(url, s.tokens["ci"], v.next())
        assert r.status_code == 429 and r.headers["retry-after"] == "10"
        clock.t += 5
        r = post(url, s.tokens["ci"], v.next())
        assert r.status_code == 429 and r.headers["retry-after"] == "5"
    s.service.close()
    recs = [r for r in read_records(s.log_path) if r.op == "sign-manifest"]
    assert [r.actor for r in recs] == ["ci"] * burst + ["officer", "ci"]
    assert "sign-refused" not in ops(s.log_path)
    refusals = [
        rec
        for rec in caplog.records
        if rec.name == "otaguard.signing.http" and "rate limit" in rec.getMessage()
    ]
    assert len(refusals) == 5
    assert all(rec.levelno == logging.WARNING and "'ci'" in rec.getMessage() for rec in refusals)


def test_default_rate_limit_applies(tmp_path: Path) -> None:
    """Without a sign_rate the service still limits: burst 10, then 429."""
    clock = FakeClock()
    s = Service(tmp_path, sign_rate=DEFAULT_SIGN_RATE, clock=clock, rate_clock=clock)
    v = Versions()
    with run_server(s.app) as url:
        codes = [post(url, s.tokens["ci"], v.next()).status_code for _ in range(11)]
        with SigningClient(url, s.tokens["ci"]) as c, pytest.raises(OtaError) as ei:
            c.sign(SigningRequest.from_dict(v.next()))
        assert ei.value.code == ErrorCode.RATE_LIMIT  # what `release create` reports
    s.service.close()
    assert codes == [200] * 10 + [429]
    assert ops(s.log_path).count("sign-manifest") == 10
