"""Schemathesis against a live server: both listeners, driven by the published OpenAPI document.

The document is fetched from the running admin listener (``/admin/v1/openapi.json``), so what
is tested is what the server publishes. For every operation, schemathesis generates requests
that follow the schema and requests that break it; the server must never answer 5xx, and every
answer must be one the document lists (status code, content type, body schema). Device
operations go to the mTLS listener with an enrolled device's certificate; admin operations to
the admin listener with a security-officer token (every permission). The example count is
bounded so that ``make test`` stays fast; ``OTAGUARD_SCHEMATHESIS_EXAMPLES`` raises it.

The negative test at the end shows the harness can fail: an endpoint that answers outside its
documented schema is caught.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    status_code_conformance,
)
from schemathesis.core.failures import FailureGroup
from schemathesis.openapi.checks import JsonSchemaError
from schemathesis.specs.openapi.checks import response_schema_conformance

from otaguard.server.context import TrustState
from otaguard.server.pki.ca import FleetCA
from otaguard.server.pki.enroll import Enrollment
from otaguard.server.storage import store
from otaguard.server.storage.db import sqlite_url
from otaguard.server.storage.tufrepo import TufRepository
from otaguard.trust.model import StaticKeys
from tests.pg import Harness, fleet_ca, harness, server_tls  # noqa: F401
from tests.test_server_api import SIGNER, publish

EXAMPLES = int(os.environ.get("OTAGUARD_SCHEMATHESIS_EXAMPLES", "25"))
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@dataclass
class Live:
    h: Harness
    device: Enrollment
    token: str
    doc: dict[str, Any]
    session: requests.Session


@pytest.fixture(scope="module")
def live(
    fleet_ca: FleetCA, server_tls: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Live]:
    tmp = tmp_path_factory.mktemp("schemathesis")
    trust = TrustState(StaticKeys([SIGNER.public_key]))
    with harness(sqlite_url(tmp / "otaguard.db"), fleet_ca, server_tls, tmp, trust=trust) as h:
        h.srv.tuf = TufRepository(tmp / "tuf")  # /tuf/ answers (no root: 404s, refusals)
        dev = h.enroll("SN-ST-1")
        rid = publish(h, "1.1.0", b"\x5a" * 4096)
        with h.db.write() as conn:
            token = store.create_token(conn, "schemathesis", "security-officer")
            store.assign(conn, store.device_by_serial(conn, "SN-ST-1").id, rid, None)  # type: ignore[union-attr]
        doc = requests.get(
            f"{h.admin_server.url}/admin/v1/openapi.json",  # type: ignore[union-attr]
            verify=str(tmp / "tls" / "ca.pem"),
            timeout=10,
        ).json()
        with requests.Session() as s:
            yield Live(h, dev, token, doc, s)


def _call(live: Live, case: Any) -> Any:
    ca = str(live.h.tmp / "tls" / "ca.pem")
    if "device" in (case.operation.definition.raw.get("tags") or []):
        return case.call(
            base_url=live.h.url,
            session=live.session,
            verify=ca,
            cert=(str(live.device.cert_path), str(live.device.key_path)),
            timeout=30,
        )
    return case.call(
        base_url=live.h.admin_server.url,  # type: ignore[union-attr]
        session=live.session,
        verify=ca,
        headers={"Authorization": f"Bearer {live.token}"},
        timeout=30,
    )


@schemathesis.serializer(
    "application/suit-envelope+cose",
    "application/cose",
    "application/octet-stream",
    "application/pkcs10",
)
def _binary(ctx: Any, value: Any) -> bytes:
    """Signed documents and images are opaque bytes to the schema: send what was generated."""
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "surrogatepass")


def _operations(doc: dict[str, Any], listener: str) -> list[Any]:
    ops = []
    for result in schemathesis.openapi.from_dict(doc).get_all_operations():
        op = result.ok()
        tags = op.definition.raw.get("tags") or []
        if listener in tags:
            ops.append(op)
    return ops


def _drive(ops: list[Any], mode: GenerationMode, call: Any) -> dict[int, int]:
    """``EXAMPLES`` generated requests per operation, sent with ``call(case)``; every failure
    is collected and reported together. Returns how often each status was answered."""
    failures: list[str] = []
    statuses: dict[int, int] = {}
    for op in ops:

        @given(case=op.as_strategy(mode))
        @settings(
            max_examples=EXAMPLES,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def run(case: Any) -> None:
            response = call(case)
            statuses[response.status_code] = statuses.get(response.status_code, 0) + 1
            case.validate_response(response, checks=CHECKS)

        try:
            run()
        except Unsatisfiable:
            # Negative mode on an operation with no input to break (no parameters or body).
            assert mode is GenerationMode.NEGATIVE, op.path
        except Exception as exc:
            failures.append(f"{op.method.upper()} {op.path}: {exc}")
    assert not failures, "\n\n".join(failures)
    return statuses


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
@pytest.mark.parametrize("listener", ["admin", "device"])
def test_no_5xx_and_every_answer_is_documented(
    live: Live, listener: str, mode: GenerationMode
) -> None:
    """Each operation of the listener, ``EXAMPLES`` generated requests that follow the schema
    (positive) or break it (negative); every failure is collected and reported together."""
    ops = _operations(live.doc, listener)
    assert len(ops) >= (20 if listener == "admin" else 5)
    statuses = _drive(ops, mode, lambda case: _call(live, case))
    # The requests reached the handlers: successes, and (negative mode) refusals of input.
    print(listener, mode.value, sorted(statuses.items()))
    assert sum(statuses.values()) >= len(ops)
    if mode is GenerationMode.NEGATIVE:
        assert statuses.get(400, 0) > 0
    else:
        assert any(200 <= code < 300 for code in statuses)


def test_the_harness_catches_an_undocumented_answer(live: Live) -> None:
    """Mutation check: with the Device schema narrowed so that the real answer breaks it, the
    same validation fails (so the test above is not vacuous)."""
    doc = dict(live.doc)
    comps = dict(doc["components"])
    schemas = dict(comps["schemas"])
    schemas["Device"] = {"type": "object", "required": ["no-such-field"]}
    comps["schemas"] = schemas
    doc["components"] = comps
    narrowed = schemathesis.openapi.from_dict(doc)
    op = narrowed["/admin/v1/devices/{serial}"]["GET"]
    case = op.Case(path_parameters={"serial": "SN-ST-1"})
    response = _call(live, case)
    assert response.status_code == 200
    with pytest.raises(FailureGroup) as caught:
        case.validate_response(response, checks=[response_schema_conformance])
    assert any(isinstance(e, JsonSchemaError) for e in caught.value.exceptions)


# --- the signing service ---------------------------------------------------------------------


@dataclass
class SigningLive:
    url: str
    token: str
    routes: set[tuple[str, str]]


@pytest.fixture(scope="module")
def signing_live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SigningLive]:
    from tests.test_signing_http import Service, run_server

    s = Service(tmp_path_factory.mktemp("signing-schemathesis"))
    routes = {
        (m.lower(), r.path) for r in s.app.routes for m in (getattr(r, "methods", None) or ())
    } - {("head", r.path) for r in s.app.routes}
    with run_server(s.app) as url:
        yield SigningLive(url, s.tokens["officer"], routes)
    s.service.close()


def test_signing_document_names_every_route(signing_live: SigningLive) -> None:
    from openapi_spec_validator import validate

    from otaguard.signing.openapi import openapi_schema

    doc = openapi_schema()
    validate(doc)
    served = requests.get(f"{signing_live.url}/v1/openapi.json", timeout=10).json()
    assert served == doc
    documented = {(m, p) for p, item in doc["paths"].items() for m in item}
    assert signing_live.routes == documented


@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_signing_service_no_5xx_and_every_answer_is_documented(
    signing_live: SigningLive, mode: GenerationMode
) -> None:
    url, token = signing_live.url, signing_live.token
    doc = requests.get(f"{url}/v1/openapi.json", timeout=10).json()
    ops = [r.ok() for r in schemathesis.openapi.from_dict(doc).get_all_operations()]
    auth = {"Authorization": f"Bearer {token}"}
    with requests.Session() as session:
        statuses = _drive(
            ops,
            mode,
            lambda case: case.call(base_url=url, session=session, headers=auth, timeout=30),
        )
    assert sum(statuses.values()) >= 6
    assert statuses.get(400, 0) > 0 if mode is GenerationMode.NEGATIVE else statuses.get(200)
