"""The bootloader: choose a slot, verify it from flash, test-boot new images, confirm/revert.

Every boot re-verifies the slot it is about to run. A PENDING slot (installed, never run) is
verified in full: the envelope in the slot's manifest area must be the one the boot state
accepted, its signature must verify against the device's *current* trust store (so a key
revoked after the download was staged stops it here), vendor/class must match OTP, its
security counter must not be below the device's, and the image bytes on flash must have the
signed size and digest.

The CONFIRMED slot is checked against the record made when it was verified and installed: the
boot state holds the SHA-256 of its envelope (``refs``), and the envelope carries the signed
image digest. So the bootloader checks that the envelope bytes hash to the record, that the
image hashes to the digest inside it, vendor/class and the security counter — but not the
signature again. That record is HMAC-authenticated under a key derived from the device's
hardware unique key (:mod:`.storage`), and it is only ever written with a ref of an envelope
whose signature was verified under the trust store (at provisioning, by the agent before it
marks a slot pending, or by the fallback's full verification); a slot with no ref is verified
in full. So no slot runs whose signature was never checked. Firmware signed with a key that
was later rotated out or revoked therefore keeps booting (a revocation must never brick the
fleet it protects), while every manifest not yet installed must pass the current trust
store. The record lives in the power-cut-safe boot state; a copy that fails its MAC counts as
corrupt (docs/reliability.md).

Boot-time verification of a pending slot ignores key validity *time* (the window was checked
at install; a key expiring before the reboot must not brick the update) but honours revocation.

Ordering for power-cut safety: a confirm first makes the new slot permanent in the boot state
and only then raises the counters; every normal boot raises the counters to the running
image's values again, so a cut between the two steps is repaired on the next boot. Raising
counters first would strand the device if the test image then reverted.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from ..crypto.algorithms import CoseAlg
from ..errors import DeviceError, ErrorCode, OtaError
from ..manifest.model import ManifestInfo
from ..manifest.verify import VerifiedManifest, decode_pinned, verify_envelope
from ..trust.model import KeyResolver, Role, TrustedKey
from ..trust.store import TrustStore
from .bootstate import BootState, BootStateStore
from .hal import BootControl, Slot, SlotMedia
from .slots import envelope_ref
from .storage import Counters, OtpData, SecureStorage

DEFAULT_MAX_TRIES = 3
BootMode = Literal["normal", "test"]


class BootResolver:
    """A trust store seen by the bootloader: revocation and role count, the clock does not."""

    def __init__(self, inner: KeyResolver) -> None:
        self.inner = inner

    @property
    def threshold(self) -> int:
        return self.inner.threshold

    def resolve(self, kid: bytes | None, alg: CoseAlg, role: Role, now: int | None) -> TrustedKey:
        if not isinstance(self.inner, TrustStore):
            return self.inner.resolve(kid, alg, role, None)
        return self.inner.resolve_untimed(kid, alg, role)


def slot_manifest(media: SlotMedia, slot: Slot, resolver: KeyResolver) -> VerifiedManifest:
    """Verify the envelope stored with ``slot`` (signature only, not the image)."""
    env = media.read_envelope(slot)
    if env is None:
        raise DeviceError(ErrorCode.NO_VALID_SLOT, f"slot {slot.name} holds no manifest")
    return verify_envelope(env, BootResolver(resolver))


def verify_slot(
    media: SlotMedia,
    slot: Slot,
    resolver: KeyResolver,
    otp: OtpData,
    counters: Counters,
    *,
    ref: bytes | None = None,
) -> VerifiedManifest:
    """Everything that must hold before ``slot`` may run. Raises the first failure's code."""
    vm = slot_manifest(media, slot, resolver)
    if ref is not None and envelope_ref(vm.envelope) != ref:
        raise DeviceError(ErrorCode.DIGEST, f"slot {slot.name} manifest is not the accepted one")
    _check_slot_contents(media, slot, vm, otp, counters)
    return vm


def recorded_manifest(media: SlotMedia, slot: Slot, ref: bytes) -> VerifiedManifest:
    """The confirmed slot's envelope, authenticated by the boot record (its SHA-256).

    No signature check: the envelope was verified against the trust store when it was
    installed, and the record pins exactly those bytes.
    """
    env = media.read_envelope(slot)
    if env is None:
        raise DeviceError(ErrorCode.NO_VALID_SLOT, f"slot {slot.name} holds no manifest")
    if envelope_ref(env) != ref:
        raise DeviceError(ErrorCode.DIGEST, f"slot {slot.name} manifest is not the recorded one")
    return decode_pinned(env)


def verify_recorded(
    media: SlotMedia, slot: Slot, otp: OtpData, counters: Counters, ref: bytes
) -> VerifiedManifest:
    """Everything that must hold before the confirmed ``slot`` may run (see module doc)."""
    vm = recorded_manifest(media, slot, ref)
    _check_slot_contents(media, slot, vm, otp, counters)
    return vm


def running_manifest(media: SlotMedia, st: BootState, resolver: KeyResolver) -> VerifiedManifest:
    """The active slot's manifest: by its record, or (no record) verified in full."""
    slot = media.slots[st.active]
    ref = st.refs[st.active]
    if ref is not None:
        return recorded_manifest(media, slot, ref)
    return slot_manifest(media, slot, resolver)


def _check_slot_contents(
    media: SlotMedia, slot: Slot, vm: VerifiedManifest, otp: OtpData, counters: Counters
) -> None:
    info = vm.info
    if info.vendor_id != otp.vendor_id:
        raise DeviceError(ErrorCode.VENDOR_ID, f"slot {slot.name} is for another vendor")
    if info.class_id != otp.class_id:
        raise DeviceError(ErrorCode.CLASS_ID, f"slot {slot.name} is for another model/hw rev")
    if info.security_counter < counters.security:
        raise DeviceError(
            ErrorCode.SECURITY_COUNTER,
            f"slot {slot.name} counter {info.security_counter} < device {counters.security}",
        )
    if info.image_size > slot.image_capacity:
        raise DeviceError(ErrorCode.SLOT_FULL, f"slot {slot.name} image larger than the slot")
    if media.hash_image(slot, info.image_size, info.digest_alg) != info.image_digest:
        raise DeviceError(ErrorCode.IMAGE_DIGEST, f"slot {slot.name} image digest mismatch")


@dataclass(frozen=True)
class BootResult:
    slot: int
    mode: BootMode
    info: ManifestInfo
    reverted: str | None = None  # error code of a pending/active slot rejected on this boot

    @property
    def slot_name(self) -> str:
        return "AB"[self.slot]

    @property
    def version(self) -> str:
        return self.info.version


class SelfBootControl:
    """The simulated bootloader is this module itself: it starts the pending slot while it has
    tries left, the confirmed one otherwise, and has no other place to mirror decisions to."""

    def __init__(self, max_tries: int) -> None:
        self.max_tries = max_tries

    def chosen(self, st: BootState) -> int:
        if st.pending is not None and st.tries < self.max_tries:
            return st.pending
        return st.active

    def pending(self, slot: int, active: int) -> None:
        pass

    def confirmed(self, slot: int) -> None:
        pass

    def reverted(self, slot: int, active: int) -> None:
        pass

    def sync(self, st: BootState) -> None:
        pass


class Bootloader:
    """The boot-time half of the state machine, on any :class:`~.hal.SlotMedia`.

    On the simulated device this *is* the bootloader. On Linux, GRUB starts a slot first and
    this runs as the first step of the booted system (``otaguard agent boot-check``): the
    :class:`~.hal.BootControl` reports what GRUB chose, and a result naming another slot than
    the running one means "reboot into it".
    """

    def __init__(
        self,
        slots: SlotMedia,
        storage: SecureStorage,
        *,
        max_tries: int = DEFAULT_MAX_TRIES,
        control: BootControl | None = None,
    ) -> None:
        if max_tries < 1:
            raise DeviceError(ErrorCode.USAGE, "max_tries must be at least 1")
        self.slots = slots
        self.storage = storage
        self.bootstate = BootStateStore(
            storage.open_record("bootstate", storage.record_key("bootstate"))
        )
        self.max_tries = max_tries
        self.control: BootControl = control if control is not None else SelfBootControl(max_tries)
        self.current: BootResult | None = None

    def trust(self) -> TrustStore:
        store = self.storage.load_trust()
        counters = self.storage.counters()
        if store.version < counters.keylist_version:
            raise DeviceError(ErrorCode.STORAGE, "stored key list is older than its counter")
        if store.version > counters.keylist_version:
            self.storage.catch_up(keylist_version=store.version)
        return store

    def boot(self) -> BootResult:
        """One power-on: decide, verify, and 'jump'. Raises E_NO_VALID_SLOT if nothing runs."""
        self.storage.power_on()  # nothing verified before this reset counts
        st = self.bootstate.load()
        otp = self.storage.require_otp()
        store = self.trust()
        counters = self.storage.counters()
        reverted: str | None = None
        pending = st.pending
        if pending is not None:
            pslot = self.slots.slots[pending]
            if self.control.chosen(st) != pending:
                # The firmware gave up on the pending slot (tries used up without a confirm).
                reverted = ErrorCode.WATCHDOG.value
                self._revert(st, ErrorCode.WATCHDOG)
                st = self.bootstate.load()
            else:
                try:
                    vm = verify_slot(self.slots, pslot, store, otp, counters, ref=st.refs[pending])
                except OtaError as err:
                    if err.code == ErrorCode.POWER_CUT:
                        raise
                    reverted = err.code.value
                    self._revert(st, err.code)
                    st = self.bootstate.load()
                else:
                    self.bootstate.save(st.test_boot())
                    self.current = BootResult(pending, "test", vm.info)
                    return self.current
        aslot = self.slots.slots[st.active]
        active_ref = st.refs[st.active]
        try:
            if active_ref is not None:
                vm = verify_recorded(self.slots, aslot, otp, counters, active_ref)
            else:
                vm = verify_slot(self.slots, aslot, store, otp, counters)
        except OtaError as err:
            if err.code == ErrorCode.POWER_CUT:
                raise
            return self._fallback(st, store, otp, counters, err.code)
        self.storage.catch_up(security=vm.info.security_counter, sequence=vm.info.sequence_number)
        self.control.sync(st)
        self.current = BootResult(st.active, "normal", vm.info, reverted)
        return self.current

    def _fallback(
        self,
        st: BootState,
        store: TrustStore,
        otp: OtpData,
        counters: Counters,
        reason: ErrorCode,
    ) -> BootResult:
        """The confirmed slot no longer verifies: test-boot the other one if it does."""
        other = st.inactive
        try:
            vm = verify_slot(self.slots, self.slots.slots[other], store, otp, counters)
        except OtaError as err:
            if err.code == ErrorCode.POWER_CUT:
                raise
            raise DeviceError(
                ErrorCode.NO_VALID_SLOT,
                f"active slot failed ({reason.value}) and slot {'AB'[other]} failed "
                f"({err.code.value})",
            ) from None
        refs = list(st.refs)
        refs[other] = envelope_ref(vm.envelope)
        new = replace(st, pending=other, tries=1, refs=(refs[0], refs[1]), last_error=reason.value)
        self.bootstate.save(new)
        self.control.pending(other, st.active)
        self.current = BootResult(other, "test", vm.info, reason.value)
        return self.current

    def _revert(self, st: BootState, reason: ErrorCode) -> None:
        assert st.pending is not None
        slot = self.slots.slots[st.pending]
        self.bootstate.save(st.reverted(reason))
        self.control.reverted(st.pending, st.active)
        self.slots.invalidate(slot)

    # --- called by the running (test-mode) image ---------------------------------------------
    def confirm(self) -> None:
        """The test-booted image passed its self-test: make it permanent, then raise counters."""
        st = self.bootstate.load()
        cur = self.current
        if cur is None or cur.mode != "test" or st.pending != cur.slot:
            raise DeviceError(ErrorCode.STATE, "confirm is only valid in a test boot")
        self.bootstate.save(st.confirmed())
        self.control.confirmed(cur.slot)
        self.storage.catch_up(security=cur.info.security_counter, sequence=cur.info.sequence_number)
        self.current = replace(cur, mode="normal")

    def reject(self, reason: ErrorCode = ErrorCode.SELF_TEST) -> None:
        """The test-booted image failed its self-test: revert to the previous slot."""
        st = self.bootstate.load()
        cur = self.current
        if cur is None or cur.mode != "test" or st.pending != cur.slot:
            raise DeviceError(ErrorCode.STATE, "reject is only valid in a test boot")
        self._revert(st, reason)
        self.current = None
