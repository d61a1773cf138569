"""``otaguard device sync``: one check-in of a simulated device with a real update server.

The same code path a fleet device runs (and the simulator drives): the device's HTTPS
transport (mTLS with its enrolled identity, the fleet CA pinned) and its update loop
(:class:`~otaguard.device.updater.Updater`: key-list update first, then the offered update
through the device's verifying agent, test boot, self-test, confirm or revert, reports). No
verification happens here; this only wires those pieces to a device directory, so that an
operator (and the README tour) can watch one device take an update from a server.
"""

from __future__ import annotations

import ssl
import tempfile
from pathlib import Path

import click

from ..errors import ErrorCode, OtaError
from .common import emit
from .device import device, dir_option

FAILED = {"unreachable", "failed", "reverted"}


@device.command("sync")
@dir_option
@click.option("--server", required=True, metavar="URL", help="Device API, https://host:8443.")
@click.option(
    "--ca",
    "ca_file",
    required=True,
    type=click.Path(dir_okay=False, path_type=Path),
    help="Fleet CA certificate (the only anchor the device trusts for the server).",
)
@click.option(
    "--cert",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Client certificate (default: the identity in the device's secure storage).",
)
@click.option("--key", type=click.Path(dir_okay=False, path_type=Path), help="Its private key.")
@click.option(
    "--self-test",
    type=click.Choice(["pass", "fail"]),
    default="pass",
    show_default=True,
    help="Outcome of the health check after the test boot into a new image.",
)
@click.option("--attempts", type=click.IntRange(1, 10), default=3, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def sync_cmd(
    directory: Path,
    server: str,
    ca_file: Path,
    cert: Path | None,
    key: Path | None,
    self_test: str,
    attempts: int,
    as_json: bool,
) -> None:
    """Check in once: install a newer key list, then any offered update (boot, self-test).

    Prints the poll result; a refused check-in (E_CERT_REVOKED ...), a refused update
    (E_SECURITY_COUNTER ...) or a revert ends with that code and exit status 1.
    """
    from ..device.device import Device
    from ..device.https_transport import HttpsTransport
    from ..device.selftest import constant
    from ..device.updater import Updater, write_identity_files

    if (cert is None) != (key is None):
        raise OtaError(ErrorCode.USAGE, "give both --cert and --key, or neither")
    with Device(directory) as dev, tempfile.TemporaryDirectory() as tmp:
        if cert is None or key is None:
            cert, key = write_identity_files(dev, tmp)
        try:
            transport = HttpsTransport(
                server, ca_file=ca_file, cert_file=cert, key_file=key, max_attempts=attempts
            )
        except FileNotFoundError as exc:
            raise OtaError(ErrorCode.NOT_FOUND, f"{exc.filename or exc}: missing") from None
        except (OSError, ssl.SSLError) as exc:
            raise OtaError(ErrorCode.CERT, f"CA, certificate or key unusable: {exc}") from None
        try:
            result = Updater(dev, transport, self_test=constant(self_test == "pass")).poll_once()
        finally:
            transport.close()
    out = result.as_dict()
    if result.outcome in FAILED:
        code = ErrorCode(result.error) if result.error else ErrorCode.STATE
        what = "check-in refused" if result.outcome == "unreachable" else f"update {result.outcome}"
        raise OtaError(
            code, f"{what}; running {result.version}, key list v{result.keylist_version}"
        )
    emit(out, as_json)
