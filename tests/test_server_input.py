"""Input that used to answer HTTP 500 (or be stored and break a listing later): refused at the
door with E_MALFORMED on the device API, the admin API and the signing service, and nothing
stored (the hardening issue's findings)."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from otaguard.errors import OtaError
from otaguard.server.device_api.endpoints import parse_range
from otaguard.wire import decimal, loads_json
from tests.pg import Harness, db_url, fleet_ca, hx, pg_cluster, server_tls  # noqa: F401
from tests.test_server_api import admin, hxt  # noqa: F401
from tests.test_signing_http import Service, body, svc  # noqa: F401

DEEP = b"[" * 5000 + b"]" * 5000
SURROGATE = b'{"id": "camp-\\ud800", "release_id": 1}'
HUGE_INT = b'{"id": "c1", "release_id": 1' + b', "deadline": ' + b"9" * 40 + b"}"


def _post(c: Any, path: str, raw: bytes) -> Any:
    return c.post(path, content=raw, headers={"Content-Type": "application/json"})


@pytest.mark.parametrize("raw", [DEEP, SURROGATE, HUGE_INT, b'{"a": NaN}', b"\xff\xfe"])
def test_admin_api_refuses_hostile_json_without_storing(hx: Harness, raw: bytes) -> None:
    op = admin(hx, "operator")
    r = _post(op, "/admin/v1/campaigns", raw)
    assert r.status_code == 400 and r.json()["error"] == "E_MALFORMED", r.text
    listing = op.get("/admin/v1/campaigns")
    assert listing.status_code == 200 and listing.json()["campaigns"] == []


def test_device_checkin_with_a_lone_surrogate_is_refused(hx: Harness) -> None:
    e = hx.enroll("SN-SUR")
    dev = hx.client(e)
    r = _post(dev, "/v1/checkin", b'{"version": "1.0.0", "last_error": "E_\\udfff"}')
    assert r.status_code == 400 and r.json()["error"] == "E_MALFORMED", r.text
    r = _post(dev, "/v1/checkin", DEEP)
    assert r.status_code == 400
    view = admin(hx, "viewer").get("/admin/v1/devices/SN-SUR")
    assert view.status_code == 200, view.text  # the device's page still renders


@pytest.mark.parametrize("value", ["\u00b2", "\u0661\u0662", "1e3", "-1", "9" * 30, ""])
def test_query_integers_must_be_ascii_decimals(hx: Harness, value: str) -> None:
    r = admin(hx, "viewer").get("/admin/v1/devices", params={"limit": value})
    assert r.status_code == 400 and r.json()["error"] == "E_MALFORMED", r.text


def test_range_with_non_ascii_digits_is_ignored_not_a_crash() -> None:
    assert parse_range("bytes=\u00b2-", 100) is None
    assert parse_range("bytes=-\u0661", 100) is None
    assert parse_range("bytes=0-9", 100) == (0, 9)


def test_signing_service_refuses_hostile_json(svc: tuple[Service, str]) -> None:
    import httpx

    s, url = svc
    for raw in (
        b"[" * 1500 + b"]" * 1500,
        b'{"version": "\\ud800"}',
        b'{"image_size": ' + b"9" * 40 + b"}",
    ):
        r = httpx.post(
            f"{url}/v1/sign",
            content=raw,
            headers={
                "Authorization": f"Bearer {s.tokens['ci']}",
                "Content-Type": "application/json",
            },
            timeout=10,
        )
        assert r.status_code == 400 and r.json()["error"] == "E_MALFORMED", r.text
    ok = httpx.post(
        f"{url}/v1/sign",
        json=body(version="7.0.0"),
        headers={"Authorization": f"Bearer {s.tokens['ci']}"},
        timeout=10,
    )
    assert ok.status_code == 200, ok.text


@given(st.binary(max_size=200))
def test_loads_json_answers_only_with_a_value_or_malformed(data: bytes) -> None:
    try:
        loads_json(data)
    except OtaError as err:
        assert err.code.value == "E_MALFORMED"


@given(st.text(max_size=30))
def test_decimal_accepts_exactly_ascii_digits(text: str) -> None:
    n = decimal(text)
    if text and len(text) <= 19 and all("0" <= c <= "9" for c in text):
        assert n == int(text)
    else:
        assert n is None


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"expires": 1_000_000_000}, "E_EXPIRED"),  # long past: every device refuses it
        ({"security_counter": 2**32}, "E_FAST_FORWARD"),
        ({"sequence_number": 2**40}, "E_FAST_FORWARD"),
    ],
)
def test_server_refuses_a_release_every_device_would_refuse(
    hxt: Harness, change: dict[str, int], code: str
) -> None:
    """Regression: the server accepted (and would offer) releases no device can install."""
    import dataclasses

    from otaguard.manifest.build import build_envelope
    from otaguard.manifest.verify import verify_envelope
    from otaguard.trust.model import StaticKeys
    from tests.test_server_api import SIGNER, make_release

    image = b"fw" * 500
    info = verify_envelope(make_release("3.0.0", image), StaticKeys([SIGNER.public_key])).info
    env = build_envelope(dataclasses.replace(info, **change), [SIGNER])  # type: ignore[arg-type]
    rm = admin(hxt, "release-manager")
    blob = rm.post("/admin/v1/images", content=image).json()["blob"]
    r = rm.post("/admin/v1/releases", params={"image": blob}, content=env)
    assert r.status_code == 400 and r.json()["error"] == code, r.text
    assert rm.get("/admin/v1/releases").json()["releases"] == []
    ok = rm.post("/admin/v1/releases", params={"image": blob}, content=make_release("3.0.0", image))
    assert ok.status_code == 201, ok.text
