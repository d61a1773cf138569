"""The simulated devices pin the update server's key (SPKI SHA-256) by default.

The CA check alone accepts any server certificate the fleet CA issued; a device that also pins
the key refuses a server that has a certificate from the same CA but another key (a CA
mis-issuance, or a second service's certificate), with E_CERT, before it sends its check-in.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from otaguard.device.https_transport import HttpsTransport
from otaguard.errors import DeviceError, ErrorCode
from otaguard.server.pki.ca import FleetCA, spki_sha256
from otaguard.server.pki.enroll import issue_server_cert
from otaguard.server.pki.mtls import ThreadedServer, server_ssl_context
from otaguard.sim import world as W
from otaguard.sim.model import SimOptions
from otaguard.sim.shard import AttackKit, ShardConfig, device_transport
from tests.pg import fleet_ca, server_tls  # noqa: F401
from tests.test_device_https_conn import _app
from tests.test_device_https_limits import Creds, device_creds  # noqa: F401


def _serve(cert: Path, key: Path, ca: Path, peers: list[Any]) -> ThreadedServer:
    """A device-API stand-in; ``peers`` gets one entry per request that reached it."""
    return ThreadedServer(_app(peers), server_ssl_context(cert, key, ca)).start()


def _cfg(url: str, ca: Path, pins: tuple[str, ...]) -> ShardConfig:
    return ShardConfig(
        url=url,
        ca_pem=ca,
        clock_name="unused",
        opts=SimOptions(),
        kit=AttackKit(b"", b"", b""),
        patch_len=1,
        keylist_target=2,
        t0=0.0,
        workers=1,
        fd_cap=4,
        spki_pins=pins,
    )


def _device(c: Creds, tmp_path: Path, url: str, pins: tuple[str, ...]) -> HttpsTransport:
    files = W.DeviceFiles("SN-LIMIT-1", tmp_path, c.cert, c.key)
    return device_transport(_cfg(url, c.ca, pins), files, 0)


def test_pinning_is_the_simulators_default() -> None:
    assert SimOptions().pin_spki is True


def test_server_with_another_key_from_the_same_ca_is_refused(
    fleet_ca: FleetCA, server_tls: Path, device_creds: Creds, tmp_path: Path
) -> None:
    pin = spki_sha256(x509.load_pem_x509_certificate((server_tls / "server.pem").read_bytes()))
    other = issue_server_cert(
        fleet_ca, tmp_path / "other", dns_names=["localhost"], ip_addresses=["127.0.0.1"]
    )
    assert spki_sha256(other.cert) != pin  # same CA, same names, another key
    seen: list[Any] = []
    genuine = _serve(
        server_tls / "server.pem", server_tls / "server.key", server_tls / "ca.pem", []
    )
    impostor = _serve(
        tmp_path / "other" / "server.pem", tmp_path / "other" / "server.key", device_creds.ca, seen
    )
    try:
        t = _device(device_creds, tmp_path, genuine.url, (pin,))
        assert t.checkin({"version": "1.0.0"}) is None  # the pinned server is fine
        t.close()

        t = _device(device_creds, tmp_path, impostor.url, (pin,))
        with pytest.raises(DeviceError) as exc:
            t.checkin({"version": "1.0.0"})
        assert exc.value.code == ErrorCode.CERT
        assert "SPKI pin" in exc.value.detail
        assert seen == []  # refused after the handshake, before the check-in was sent
        t.close()

        # what the pin adds: with the CA check alone (pin_spki=False), the impostor passes
        t = _device(device_creds, tmp_path, impostor.url, ())
        assert t.checkin({"version": "1.0.0"}) is None
        assert len(seen) == 1
        t.close()
    finally:
        genuine.stop()
        impostor.stop()
