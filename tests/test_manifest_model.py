"""ids, versions, ManifestInfo validation, and the applicability conditions."""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otaguard.crypto.algorithms import HashAlg
from otaguard.errors import ErrorCode, ManifestConditionError, OtaError
from otaguard.manifest.conditions import DeviceFacts, check_applicable
from otaguard.manifest.ids import class_id, uuid_from_bytes, vendor_id
from otaguard.manifest.model import DeltaInfo, ManifestInfo, info_to_dict
from otaguard.manifest.version import (
    compare_versions,
    format_version,
    parse_version,
    version_ge,
    version_gt,
    version_le,
    version_lt,
)

VENDOR = vendor_id("acme.example")
CLASS = class_id(VENDOR, "sensor", "r2")


def info(**kw: object) -> ManifestInfo:
    base = ManifestInfo(
        sequence_number=10,
        vendor_id=VENDOR,
        class_id=CLASS,
        digest_alg=HashAlg.SHA256,
        image_digest=hashlib.sha256(b"fw").digest(),
        image_size=1000,
        version="2.0.0",
        min_version="1.5.0",
        security_counter=4,
        expires=2000,
        uri=None,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def facts(**kw: object) -> DeviceFacts:
    base = DeviceFacts(
        vendor_id=VENDOR,
        class_id=CLASS,
        running_version="1.5.0",
        security_counter=4,
        last_sequence=9,
        now=1000,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


# --- ids -----------------------------------------------------------------------------------
def test_ids_are_uuid5() -> None:
    assert vendor_id("acme.example") == uuid.uuid5(uuid.NAMESPACE_DNS, "acme.example")
    assert uuid.uuid5(VENDOR, "sensor:r2") == CLASS
    assert CLASS.version == 5
    assert class_id(VENDOR, "sensor", "r3") != CLASS
    # the draft's example vendor id is UUID5(DNS, "arm.com")
    assert str(vendor_id("arm.com")) == "fa6b4a53-d5ad-5fdf-be9d-e663e4d41ffe"


def test_ids_refuse_bad_input() -> None:
    for bad in ("", "  "):
        with pytest.raises(OtaError):
            vendor_id(bad)
    with pytest.raises(OtaError):
        class_id(VENDOR, "a:b", "r1")
    with pytest.raises(OtaError):
        class_id(VENDOR, "", "r1")
    with pytest.raises(OtaError) as exc:
        uuid_from_bytes(b"\x00" * 15, "vendor-id")
    assert exc.value.code == ErrorCode.MALFORMED


# --- versions ------------------------------------------------------------------------------
def test_parse_and_compare_versions() -> None:
    assert parse_version("1.2.3") == (1, 2, 3)
    assert parse_version("0") == (0,)
    assert compare_versions("1.2", "1.2.0") == 0
    assert compare_versions("1.10.0", "1.9.9") == 1
    assert version_lt("1.2.3", "1.2.4") and version_le("1.2.3", "1.2.3")
    assert version_gt("2", "1.99") and version_ge("2.0", "2")
    assert format_version([1, 0, 7]) == "1.0.7"
    for bad in ("", "1.", ".1", "01.2", "1.2.3-rc1", "v1", "1..2", "1.2.3.4.5.6.7.8.9", " 1"):
        with pytest.raises(OtaError) as exc:
            parse_version(bad)
        assert exc.value.code == ErrorCode.MALFORMED
    with pytest.raises(OtaError):
        format_version([])
    with pytest.raises(OtaError):
        format_version([1, -1])


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=8),
    st.lists(st.integers(0, 2**32 - 1), min_size=1, max_size=8),
)
def test_version_order_matches_padded_tuples(a: list[int], b: list[int]) -> None:
    n = max(len(a), len(b))
    pa, pb = a + [0] * (n - len(a)), b + [0] * (n - len(b))
    expected = (pa > pb) - (pa < pb)
    assert compare_versions(format_version(a), format_version(b)) == expected
    assert parse_version(format_version(a)) == tuple(a)


# --- ManifestInfo.validate ----------------------------------------------------------------
def test_validate_ranges() -> None:
    info().validate()
    bad = [
        {"sequence_number": -1},
        {"security_counter": 2**64},
        {"image_size": True},
        {"image_digest": b"short"},
        {"digest_alg": HashAlg.SHA384},  # digest length does not fit
        {"version": "1.x"},
        {"min_version": "abc"},
        {"uri": ""},
        {"text": {"k": 1}},
        {"delta": DeltaInfo(b"x", b"y", 1, None)},
    ]
    for change in bad:
        with pytest.raises(OtaError) as exc:
            info(**change).validate()
        assert exc.value.code == ErrorCode.MALFORMED, change


def test_info_to_dict_is_jsonable() -> None:
    import json

    d = info_to_dict(
        info(delta=DeltaInfo(b"\x01" * 32, b"\x02" * 32, 5, "https://x/p"), text={"model": "m"})
    )
    json.dumps(d)
    assert d["vendor_id"] == str(VENDOR) and d["digest_alg"] == "sha256"
    assert d["delta"]["patch_size"] == 5  # type: ignore[index]


# --- conditions ----------------------------------------------------------------------------
def test_applicable() -> None:
    check_applicable(info(), facts())
    check_applicable(info(expires=None), facts(now=10**12))
    check_applicable(info(), facts(now=None))  # no clock: expiry cannot be judged here
    check_applicable(info(min_version=None), facts(running_version="0.0.1"))
    check_applicable(info(security_counter=5), facts())  # counter may rise


@pytest.mark.parametrize(
    ("inf", "fct", "code"),
    [
        ({}, {"vendor_id": vendor_id("other.example")}, ErrorCode.VENDOR_ID),
        ({}, {"class_id": class_id(VENDOR, "sensor", "r3")}, ErrorCode.CLASS_ID),
        ({}, {"running_version": "1.4.99"}, ErrorCode.MIN_VERSION),
        ({"security_counter": 3}, {}, ErrorCode.SECURITY_COUNTER),
        ({"sequence_number": 9}, {}, ErrorCode.REPLAY),
        ({"sequence_number": 8}, {}, ErrorCode.REPLAY),
        ({"expires": 999}, {}, ErrorCode.EXPIRED),
    ],
)
def test_not_applicable(inf: dict[str, object], fct: dict[str, object], code: ErrorCode) -> None:
    with pytest.raises(ManifestConditionError) as exc:
        check_applicable(info(**inf), facts(**fct))
    assert exc.value.code == code


def test_expiry_boundary_is_inclusive() -> None:
    check_applicable(info(expires=1000), facts(now=1000))
    with pytest.raises(ManifestConditionError):
        check_applicable(info(expires=1000), facts(now=1001))
