"""The delta flows (tests/test_server_delta.py) again, every prepared statement cross-checked
against SQLAlchemy Core (tests/prepared_check.py): the delta lookup and the delta-blob fetch
check only return rows here."""

from __future__ import annotations

from tests.pg import db_url, fleet_ca, harness, pg_cluster, server_tls  # noqa: F401
from tests.prepared_check import cross_check  # noqa: F401  (autouse)
from tests.test_server_delta import (  # noqa: F401  (re-run under the cross-check)
    hxt,
    test_delta_offer_by_running_digest_and_range,
    test_device_installs_through_server_delta,
)
