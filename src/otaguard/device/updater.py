"""The device's polling client: one check-in cycle, driven by the caller's scheduler.

:meth:`Updater.poll_once` is one cycle:

1. check in (running version, security counter, key-list version, slot state, running image
   digest, last error, suspect count);
2. if the server publishes a newer key list, fetch and apply it FIRST (atomic, version
   monotonic) — an emergency revocation therefore lands before any update of the same
   check-in is even looked at, and a manifest signed by the revoked key is refused;
3. with certificate renewal on (``renewal``): when the device certificate is due, get a new
   one and put it to use with a second check-in (device/renewal.py; every check-in goes
   through its flow, which presents a pending renewed identity first);
4. if an update is offered: install → reboot → test boot → self-test → confirm or revert →
   report the outcome.

There is no sleeping and no wall clock inside: the caller decides when to call again
(``PollResult.next_poll``), and time comes from an injected :class:`~otaguard.clock.Clock`,
so a fleet simulator can drive thousands of these on a :class:`~otaguard.clock.SimClock`.
A "reboot" is the bootloader running again on the same flash (what constructing a new
:class:`~.device.Device` on the directory would also do).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from ..clock import SYSTEM_CLOCK, Clock
from ..errors import ErrorCode, OtaError
from ..fsutil import atomic_write
from ..trust.store import TrustStore
from .agent import InstallResult
from .bootloader import Bootloader, BootResult, running_manifest
from .hal import SlotMedia
from .renewal import CertRenewal
from .selftest import SelfTest
from .storage import Identity, SecureStorage
from .transport import Transport

DEFAULT_POLL_INTERVAL = 3600


class DeviceRuntime(Protocol):
    """What the polling cycle needs of a device: the simulated :class:`~.device.Device` and
    the Linux :class:`~.linux.system.LinuxDevice` both provide it."""

    @property
    def storage(self) -> SecureStorage: ...

    @property
    def bootloader(self) -> Bootloader: ...

    @property
    def slots(self) -> SlotMedia: ...

    def boot(self) -> BootResult: ...

    def run_self_test(self, test: SelfTest) -> str: ...

    def install(self, transport: Transport) -> InstallResult: ...

    def apply_keylist_update(self, update: bytes) -> int: ...


class CheckinTransport(Transport, Protocol):
    """A transport that can also check in and serve the published key list
    (:class:`~.https_transport.HttpsTransport` is one)."""

    last_checkin: dict[str, Any] | None

    def checkin(self, facts: dict[str, Any] | None = None) -> dict[str, Any] | None: ...

    def keylist(self, etag: str | None = None) -> tuple[bytes, str] | None: ...


@dataclass(frozen=True)
class _State:
    """What the device knows about itself between two writes to its flash: the verified
    trust store, the boot state, the running manifest's facts, counters and agent state."""

    trust: TrustStore
    version: str
    facts: dict[str, Any]


@dataclass(frozen=True)
class PollResult:
    at: float  # clock time the cycle started
    outcome: str  # unreachable | idle | keylist | confirmed | reverted | failed
    version: str  # running version after the cycle
    keylist_version: int  # after the cycle
    keylist_from: int | None = None  # set when a key-list update was installed
    keylist_error: str | None = None  # code of a refused key-list update
    offered: str | None = None  # version the server offered
    error: str | None = None  # code of the failure (install, boot, transport)
    next_poll: float = 0.0
    cert: str | None = None  # "renewed", or the code of a failed renewal
    method: str | None = None  # "delta" or "full" when an image was installed

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _always_pass(_boot: BootResult) -> bool:
    return True


class Updater:
    def __init__(
        self,
        device: DeviceRuntime,
        transport: CheckinTransport,
        *,
        clock: Clock = SYSTEM_CLOCK,
        self_test: SelfTest = _always_pass,
        poll_interval: int = DEFAULT_POLL_INTERVAL,
        keep_state: bool = False,
        renewal: CertRenewal | None = None,
    ) -> None:
        """``keep_state``: keep the verified device state in memory between polls (what a
        powered-on device does: it verified its trust store and boot state at power-on and
        only re-reads them after it wrote them itself). Only valid when nothing but this
        updater changes the device while it runs; a new Updater (a reboot) verifies again.
        Without it the state is re-read and re-verified from flash at every poll."""
        self.device = device
        self.transport = transport
        self.clock = clock
        self.self_test = self_test
        self.poll_interval = poll_interval
        self._keylist_etag: str | None = None
        self.keep_state = keep_state
        self._state: _State | None = None
        self.renewal = renewal

    def _invalidate(self) -> None:
        self._state = None

    def _load_state(self) -> _State:
        if self._state is not None:
            return self._state
        dev = self.device
        st = dev.bootloader.bootstate.load()
        store = dev.bootloader.trust()
        running = running_manifest(dev.slots, st, store)
        counters = dev.storage.counters()
        agent = dev.storage.agent_state()
        facts: dict[str, Any] = {
            "version": running.info.version,
            "security_counter": counters.security,
            "keylist_version": store.version,
            "running_digest": running.info.image_digest.hex(),
            "slot_state": {
                "active": "AB"[st.active],
                "pending": None if st.pending is None else "AB"[st.pending],
                "tries": st.tries,
                "last_error": st.last_error,
            },
            "suspects": len(agent.suspects),
        }
        last_error = agent.last_error or st.last_error
        if last_error:
            facts["last_error"] = last_error
        self._state = _State(store, running.info.version, facts)
        return self._state

    # --- device facts --------------------------------------------------------------------------
    def facts(self) -> dict[str, Any]:
        facts = self._load_state().facts
        return {**facts, "slot_state": dict(facts["slot_state"])}

    # --- one cycle -----------------------------------------------------------------------------
    def poll_once(self) -> PollResult:
        at = self.clock.now()
        dev = self.device
        if not self.keep_state:
            self._invalidate()
        if dev.bootloader.current is None:
            self._invalidate()
            dev.boot()  # power-on
        if dev.bootloader.current is not None and dev.bootloader.current.mode == "test":
            # A test boot left over from an interrupted cycle (or, on a real device, the boot
            # into the new image that this very process follows): settle it and say so.
            self._invalidate()
            self._settle(dev.bootloader.current)
        try:
            offered = self._checkin()
        except OtaError as err:
            if err.code == ErrorCode.POWER_CUT:
                raise
            return self._result(at, "unreachable", error=err.code.value)
        resp = self.transport.last_checkin or {}
        interval = resp.get("poll_interval")
        if isinstance(interval, int) and not isinstance(interval, bool) and interval > 0:
            self.poll_interval = interval
        kl_from, kl_error = self._keylist_step(resp)
        if kl_from is not None:
            # Tell the server at once which list we hold now (rotation progress), and get an
            # offer judged against it.
            try:
                offered = self._checkin()
            except OtaError as err:
                if err.code == ErrorCode.POWER_CUT:
                    raise
        cert, renewed_offer = self._renewal_step()
        if renewed_offer is not None:
            offered = renewed_offer[0]
        if offered is None:
            outcome = "keylist" if kl_from is not None else "idle"
            return self._result(
                at, outcome, keylist_from=kl_from, keylist_error=kl_error, cert=cert
            )
        version = str(offered.get("version"))
        outcome, error, method = self._install_step()
        self._invalidate()  # re-read what the install, boots and self-test wrote
        return self._result(
            at,
            outcome,
            keylist_from=kl_from,
            keylist_error=kl_error,
            offered=version,
            error=error,
            cert=cert,
            method=method,
        )

    def _checkin(self) -> dict[str, Any] | None:
        if self.renewal is None:
            return self.transport.checkin(self.facts())
        return self.renewal.checkin(lambda: self.transport.checkin(self.facts()))

    def _renewal_step(self) -> tuple[str | None, tuple[dict[str, Any] | None] | None]:
        """Renew the device certificate if due: (outcome, (offer of the check-in that put the
        new identity to use,)) — the offer only when that check-in ran."""
        if self.renewal is None:
            return None, None
        try:
            if not self.renewal.renew_if_due():
                return None, None
        except OtaError as err:
            if err.code == ErrorCode.POWER_CUT:
                raise
            return err.code.value, None  # the current identity is untouched; next poll again
        try:
            offer = self._checkin()
        except OtaError as err:
            if err.code == ErrorCode.POWER_CUT:
                raise
            return err.code.value, None
        ident = self.renewal.store.identity()
        done = ident is not None and ident.pending_key is None
        return ("renewed" if done else "pending"), (offer,)

    def _settle(self, boot: BootResult) -> None:
        result = self.device.run_self_test(self.self_test)
        self._invalidate()
        if result == "confirmed":
            self._report({"event": "confirmed", "version": boot.version})
        elif result == "reverted":
            self._record_error(OtaError(ErrorCode.SELF_TEST, "self-test failed"), "self-test")
            self._report({"event": "reverted", "error": ErrorCode.SELF_TEST.value})
            self.device.boot()  # back on the previous image

    def _keylist_step(self, resp: dict[str, Any]) -> tuple[int | None, str | None]:
        """Install the published key list if it is newer; (old version, refusal code)."""
        published = resp.get("keylist_version")
        current = self._load_state().trust.version
        if not isinstance(published, int) or published <= current:
            return None, None
        try:
            got = self.transport.keylist(self._keylist_etag)
            if got is None:  # unchanged since our last fetch, which we could not install
                got = self.transport.keylist(None)
            assert got is not None
            doc, etag = got
            self._invalidate()
            new = self.device.apply_keylist_update(doc)
        except OtaError as err:
            if err.code == ErrorCode.POWER_CUT:
                raise
            self._record_error(err, "key-list update")
            return None, err.code.value
        self._keylist_etag = etag
        self._report({"event": "keylist-installed", "detail": f"key list v{current} -> v{new}"})
        return current, None

    def _install_step(self) -> tuple[str, str | None, str | None]:
        dev = self.device
        self._invalidate()  # install, boots and self-test write flash; re-read afterwards
        try:
            method = dev.install(self.transport).method  # the agent reports itself
        except OtaError as err:
            if err.code == ErrorCode.POWER_CUT:
                raise
            return "failed", err.code.value, None
        boot = dev.boot()  # reboot into the new image (test mode) or back to the old one
        if boot.mode != "test":
            code = boot.reverted or ErrorCode.NO_VALID_SLOT.value
            self._record_error(OtaError(ErrorCode(code), "new image refused at boot"), "boot")
            self._report({"event": "reverted", "error": code, "version": boot.version})
            return "reverted", code, method
        result = dev.run_self_test(self.self_test)
        if result == "confirmed":
            self._report({"event": "confirmed", "version": boot.version})
            return "confirmed", None, method
        dev.boot()  # back on the previous image
        code = ErrorCode.SELF_TEST.value
        self._record_error(OtaError(ErrorCode.SELF_TEST, "self-test failed"), "self-test")
        self._report({"event": "reverted", "error": code, "version": self._version()})
        return "reverted", code, method

    # --- helpers -------------------------------------------------------------------------------
    def _version(self) -> str:
        return self._load_state().version

    def _record_error(self, err: OtaError, what: str) -> None:
        storage = self.device.storage
        self._invalidate()
        state = storage.agent_state()
        storage.write_agent_state(
            replace(state, last_error=err.code.value, last_detail=f"{what}: {err.detail}")
        )
        if what == "key-list update":
            self._report({"event": "error", "error": err.code.value, "detail": what})

    def _report(self, event: dict[str, Any]) -> None:
        try:
            self.transport.report(event)
        except OtaError as err:
            if err.code == ErrorCode.POWER_CUT:
                raise

    def _result(self, at: float, outcome: str, **kw: Any) -> PollResult:
        state = self._load_state()
        return PollResult(
            at=at,
            outcome=outcome,
            version=state.version,
            keylist_version=state.trust.version,
            next_poll=at + self.poll_interval,
            **kw,
        )


def write_identity_files(
    device: DeviceRuntime, directory: str | os.PathLike[str]
) -> tuple[Path, Path]:
    """Export the device identity in secure storage as (cert.pem, key.pem) for the TLS client.

    After a re-enrollment (``fleet enroll --replace``) the new key and certificate are written
    into secure storage (:meth:`~.storage.SecureStorage.write_identity`); the next transport is
    built from these files, so the device presents the new identity.
    """
    ident = device.storage.identity()
    if ident is None:
        raise OtaError(ErrorCode.STATE, "device has no identity in secure storage")
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    cert, key = d / "device.pem", d / "device.key"
    atomic_write(cert, ident.certificate)
    atomic_write(key, ident.device_key, mode=0o600)
    return cert, key


def install_identity(device: DeviceRuntime, key_pem: bytes, cert_pem: bytes) -> None:
    """Replace the device identity (re-enrollment): one power-cut-safe record write."""
    device.storage.write_identity(Identity(key_pem, cert_pem))
