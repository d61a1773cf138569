"""Signing policy: each rule refuses with its own code; state stays monotonic."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otaguard.crypto.algorithms import HashAlg
from otaguard.errors import ErrorCode, FormatError, OtaError, PolicyError
from otaguard.manifest.version import compare_versions
from otaguard.signing.policy import (
    Grant,
    LastRelease,
    Policy,
    Requester,
    Role,
    SigningRequest,
    check_request,
)

NOW = 1_800_000_000
DAY = 86400
CI = Requester("ci", Role.RELEASE)
SO = Requester("officer", Role.SECURITY_OFFICER)
VIEWER = Requester("ci", Role.VIEWER)

POLICY = Policy(
    grants={
        "ci": (Grant("example.com", "thermo-*", "*"), Grant("example.com", "gw", "B")),
        "officer": (Grant("example.com"),),
    },
    max_validity_days=90,
    uri_prefixes=("https://updates.example.com/",),
    max_image_size=1 << 20,
)


def req(**kw: Any) -> SigningRequest:
    base: dict[str, Any] = {
        "image_digest": b"\x11" * 32,
        "digest_alg": HashAlg.SHA256,
        "image_size": 1000,
        "vendor": "example.com",
        "model": "thermo-x",
        "hw_rev": "A",
        "version": "2.0.0",
        "min_version": "1.0.0",
        "security_counter": 5,
        "expires": NOW + 30 * DAY,
        "uri": "https://updates.example.com/fw.bin",
    }
    base.update(kw)
    return SigningRequest(**base)


LAST = LastRelease(version="1.5.0", security_counter=5, sequence=100)


def refused(code: ErrorCode, r: SigningRequest, who: Requester | None = CI, **kw: Any) -> None:
    with pytest.raises(PolicyError) as ei:
        check_request(kw.get("policy", POLICY), r, who, kw.get("last", LAST), NOW)
    assert ei.value.code == code, ei.value


def test_allowed() -> None:
    check_request(POLICY, req(), CI, LAST, NOW)
    check_request(POLICY, req(), CI, None, NOW)
    check_request(POLICY, req(model="gw", hw_rev="B"), CI, None, NOW)


def test_auth_and_roles() -> None:
    refused(ErrorCode.AUTH, req(), None)
    refused(ErrorCode.AUTH, req(), Requester("", Role.RELEASE))
    refused(ErrorCode.FORBIDDEN, req(), VIEWER)
    # only a security officer may set the downgrade flag, even for an upgrade
    refused(ErrorCode.FORBIDDEN, req(downgrade=True), CI)


@pytest.mark.parametrize(
    "change",
    [
        {"model": "other"},
        {"model": "gw", "hw_rev": "A"},
        {"vendor": "evil.example"},
        {"expires": None},
        {"expires": NOW - 1},
        {"expires": NOW + 91 * DAY},
        {"uri": "http://elsewhere/fw.bin"},
        {"uri": None},
        {"image_size": 0},
        {"image_size": (1 << 20) + 1},
        {"min_version": "2.1.0"},
    ],
)
def test_policy_refusals(change: dict[str, Any]) -> None:
    refused(ErrorCode.POLICY, req(**change))


def test_unknown_requester_and_digest_alg() -> None:
    refused(ErrorCode.POLICY, req(), Requester("stranger", Role.RELEASE))
    p = dataclasses.replace(POLICY, digest_algs=frozenset({HashAlg.SHA384}))
    refused(ErrorCode.POLICY, req(), policy=p)


def test_security_counter_never_decreases() -> None:
    refused(ErrorCode.SECURITY_COUNTER, req(security_counter=4))
    # not even with an authorized downgrade
    refused(ErrorCode.SECURITY_COUNTER, req(security_counter=4, downgrade=True), SO)
    check_request(POLICY, req(security_counter=5), CI, LAST, NOW)


def test_version_monotonic_unless_authorized_downgrade() -> None:
    refused(ErrorCode.DOWNGRADE, req(version="1.4.9", min_version=None))
    refused(ErrorCode.DOWNGRADE, req(version="1.5.0", min_version=None))  # equal is not above
    refused(ErrorCode.DOWNGRADE, req(version="1.5", min_version=None))  # 1.5 == 1.5.0
    refused(ErrorCode.DOWNGRADE, req(version="1.4.9", min_version=None), SO)  # flag missing
    check_request(POLICY, req(version="1.4.9", min_version=None, downgrade=True), SO, LAST, NOW)


def test_request_json_roundtrip_and_malformed() -> None:
    r = req(description="hello", downgrade=True)
    assert SigningRequest.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    good = r.to_dict()
    bad_cases: list[dict[str, Any]] = [
        {**good, "extra": 1},
        {**good, "image_digest": "11" * 31},
        {**good, "image_digest": "zz" * 32},
        {**good, "digest_alg": "md5"},
        {**good, "image_size": -1},
        {**good, "image_size": True},
        {**good, "security_counter": "5"},
        {**good, "version": "1.2.3-rc1"},
        {**good, "model": "a:b"},
        {**good, "model": ""},
        {**good, "downgrade": "yes"},
        {**good, "expires": 1.5},
    ]
    for case in bad_cases:
        with pytest.raises(FormatError) as ei:
            SigningRequest.from_dict(case)
        assert ei.value.code in (ErrorCode.MALFORMED, ErrorCode.USAGE), case
    with pytest.raises(FormatError):
        SigningRequest.from_dict([1, 2])
    sha384 = {**good, "digest_alg": "sha384", "image_digest": "22" * 48}
    assert SigningRequest.from_dict(sha384).digest_alg == HashAlg.SHA384


def test_policy_file() -> None:
    doc = {
        "version": 1,
        "requesters": {"ci": [{"vendor": "example.com", "model": "thermo-*"}]},
        "max_validity_days": 30,
        "uri_prefixes": ["https://u/"],
        "digest_algs": ["sha256"],
    }
    p = Policy.from_json(json.dumps(doc).encode())
    assert p.grants["ci"] == (Grant("example.com", "thermo-*", "*"),)
    assert p.digest_algs == frozenset({HashAlg.SHA256}) and p.require_expiry
    for bad in [
        b"not json",
        json.dumps({**doc, "version": 2}).encode(),
        json.dumps({**doc, "surprise": 1}).encode(),
        json.dumps({**doc, "requesters": {"ci": [{"model": "x"}]}}).encode(),
        json.dumps({**doc, "requesters": {"ci": [{"vendor": "e", "typo": "x"}]}}).encode(),
        json.dumps({**doc, "max_validity_days": 0}).encode(),
        json.dumps({**doc, "digest_algs": ["md5"]}).encode(),
        b" " * (300 * 1024),
    ]:
        with pytest.raises(FormatError):
            Policy.from_json(bad)


versions = st.tuples(st.integers(0, 3), st.integers(0, 3)).map(lambda t: f"{t[0]}.{t[1]}")


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(versions, st.integers(0, 4), st.booleans(), st.sampled_from(["m1", "m2"])),
        max_size=25,
    )
)
def test_accepted_history_is_monotonic(steps: list[tuple[str, int, bool, str]]) -> None:
    """Whatever is asked, what gets signed never lowers the counter, and the version only
    goes down with an officer's explicit downgrade."""
    last: dict[str, LastRelease] = {}
    seq = 0
    for version, counter, downgrade, model in steps:
        r = req(
            model=f"thermo-{model}",
            version=version,
            min_version=None,
            security_counter=counter,
            downgrade=downgrade,
        )
        prev = last.get(model)
        try:
            check_request(POLICY, r, SO, prev, NOW)
        except OtaError as err:
            assert err.code in (
                ErrorCode.DOWNGRADE,
                ErrorCode.SECURITY_COUNTER,
                ErrorCode.FAST_FORWARD,
            )
            assert prev is not None
            continue
        if prev is not None:
            assert counter >= prev.security_counter
            assert int(version.split(".")[0]) - int(prev.version.split(".")[0]) <= 1
            assert compare_versions(version, prev.version) > 0 or downgrade
        seq += 1
        last[model] = LastRelease(version, counter, seq)
