"""The update agent: DESIGN §6 steps 1–5, each failure with its own error code.

1. fetch the manifest into RAM and verify it against the trust store; a manifest that fails
   is dropped at once and its source recorded as *suspect* (reported at the next successful
   check-in);
2. check vendor/class, minimum version, security counter, sequence number and expiry —
   before a single image byte is requested;
3. stream the image into the inactive slot with a running hash; progress is checkpointed in
   a staging record so a reboot resumes (re-hashing what is already on flash);
4. compare digest and size; on mismatch erase the staging slot and abort;
5. write the envelope next to the image, re-verify the slot from flash, mark it pending.

The running firmware is never touched: only the inactive slot and the staging record are
written until the final boot-state write that marks the slot pending.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ..errors import DeviceError, ErrorCode, OtaError
from ..manifest.conditions import DeviceFacts, check_applicable
from ..manifest.verify import VerifiedManifest, verify_envelope
from ..trust.store import TrustStore
from .bootloader import Bootloader, slot_manifest, verify_slot
from .flash import Flash
from .layout import Layout, SlotRegion
from .slots import (
    SlotWriter,
    envelope_ref,
    erase_image,
    invalidate,
    manifest_capacity,
    write_envelope,
)
from .storage import SecureStorage, Staging, keylist_signer
from .transport import Transport, endpoint_of

DEFAULT_CHECKPOINT = 64 * 1024
Clock = Callable[[], int | None]


def system_clock() -> int | None:
    return int(time.time())


@dataclass(frozen=True)
class InstallResult:
    slot: int
    version: str
    resumed_from: int
    image_size: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "slot": "AB"[self.slot],
            "version": self.version,
            "resumed_from": self.resumed_from,
            "image_size": self.image_size,
            "next": "reboot to test-boot the new image",
        }


class UpdateAgent:
    def __init__(
        self,
        flash: Flash,
        layout: Layout,
        storage: SecureStorage,
        bootloader: Bootloader,
        *,
        clock: Clock = system_clock,
        checkpoint: int = DEFAULT_CHECKPOINT,
    ) -> None:
        ss = layout.geometry.sector_size
        if checkpoint < ss or checkpoint % ss:
            raise DeviceError(ErrorCode.USAGE, "checkpoint must be a multiple of the sector size")
        self.flash = flash
        self.layout = layout
        self.storage = storage
        self.bootloader = bootloader
        self.clock = clock
        self.checkpoint = checkpoint

    # --- full-image install ------------------------------------------------------------------
    def install(self, transport: Transport) -> InstallResult:
        st = self.bootloader.bootstate.load()
        if st.pending is not None:
            raise self._fail(
                transport,
                DeviceError(
                    ErrorCode.STATE, "an installed update is still waiting for its test boot"
                ),
            )
        store = self.bootloader.trust()
        now = store.effective_time(self.clock())
        vm = self._fetch_and_verify(transport, store, now)
        slot = self.layout.slots[st.inactive]
        try:
            self._check(vm, store, st.active, slot, now)
            return self._download(transport, vm, store, slot)
        except OtaError as err:
            if err.code in (ErrorCode.POWER_CUT, ErrorCode.TRANSPORT):
                # Power cut: nothing to do (simulation). Drop: keep the staging to resume.
                if err.code == ErrorCode.TRANSPORT:
                    self._fail(transport, err)
                raise
            self._abort(slot, vm.info.image_size)
            raise self._fail(transport, err) from None

    def _fetch_and_verify(
        self, transport: Transport, store: TrustStore, now: int | None
    ) -> VerifiedManifest:
        try:
            raw = transport.fetch_manifest()
        except OtaError as err:
            if err.code == ErrorCode.POWER_CUT:
                raise
            raise self._fail(transport, err) from None
        try:
            vm = verify_envelope(raw, store, now=now)
        except OtaError as err:
            # Delete at once: the unverified bytes are never stored or parsed further.
            del raw
            self._suspect(transport, err)
            raise self._fail(transport, err) from None
        self._report_suspects(transport)
        return vm

    def _check(
        self,
        vm: VerifiedManifest,
        store: TrustStore,
        active: int,
        slot: SlotRegion,
        now: int | None,
    ) -> None:
        otp = self.storage.require_otp()
        counters = self.storage.counters()
        running = slot_manifest(self.flash, self.layout.slots[active], store)
        facts = DeviceFacts(
            vendor_id=otp.vendor_id,
            class_id=otp.class_id,
            running_version=running.info.version,
            security_counter=counters.security,
            last_sequence=counters.sequence,
            now=now,
        )
        check_applicable(vm.info, facts)
        if vm.info.delta is not None:
            raise DeviceError(ErrorCode.UNSUPPORTED, "delta releases need a delta-capable agent")
        if vm.info.image_size > slot.image_capacity:
            raise DeviceError(
                ErrorCode.SLOT_FULL,
                f"image of {vm.info.image_size} bytes exceeds slot {slot.name} "
                f"({slot.image_capacity} bytes)",
            )
        if len(vm.envelope) > manifest_capacity(slot):
            raise DeviceError(ErrorCode.TOO_LARGE, "manifest exceeds the slot's manifest area")

    def _download(
        self, transport: Transport, vm: VerifiedManifest, store: TrustStore, slot: SlotRegion
    ) -> InstallResult:
        info = vm.info
        ref = envelope_ref(vm.envelope)
        staging = self.storage.staging()
        start = 0
        if (
            staging is not None
            and staging.slot == slot.index
            and staging.manifest_digest == ref
            and staging.image_size == info.image_size
        ):
            start = staging.committed
        else:
            self.storage.write_staging(Staging(slot.index, ref, 0, info.image_size))
            invalidate(self.flash, slot)
        writer = SlotWriter(self.flash, slot, info.image_size, info.digest_alg, start=start)
        saved = writer.committed
        for chunk in transport.open_image(start):
            writer.write(chunk)
            if writer.committed - saved >= self.checkpoint:
                saved = writer.committed
                self.storage.write_staging(Staging(slot.index, ref, saved, info.image_size))
        digest = writer.finish()
        if digest != info.image_digest:
            raise DeviceError(ErrorCode.IMAGE_DIGEST, "image digest does not match the manifest")
        write_envelope(self.flash, slot, vm.envelope)
        # Read back from flash: the running hash proved the transport, this proves the flash.
        verify_slot(
            self.flash,
            slot,
            store,
            self.storage.require_otp(),
            self.storage.counters(),
            ref=ref,
        )
        st = self.bootloader.bootstate.load()
        self.bootloader.bootstate.save(st.with_pending(slot.index, ref))
        self.storage.write_staging(None)
        state = self.storage.agent_state()
        if state.last_error is not None:
            self.storage.write_agent_state(replace(state, last_error=None, last_detail=""))
        self._report(transport, {"event": "installed", "version": info.version})
        return InstallResult(slot.index, info.version, start, info.image_size)

    def _abort(self, slot: SlotRegion, size: int) -> None:
        """Erase staging: the slot's manifest area and whatever image bytes were written."""
        try:
            invalidate(self.flash, slot)
            erase_image(self.flash, slot, min(size, slot.image_capacity))
            self.storage.write_staging(None)
        except OtaError as err:
            if err.code == ErrorCode.POWER_CUT:
                raise
            # A read error while cleaning up: the manifest area is what matters; it is erased
            # unconditionally so the slot can never verify.
            self.flash.erase_range(slot.manifest_offset, slot.manifest_size)
            self.storage.write_staging(None)

    # --- key-list updates --------------------------------------------------------------------
    def apply_keylist_update(self, update: bytes) -> int:
        """Verify and persist a key-list update; returns the new key-list version.

        Refused with E_WOULD_BRICK if the running (or pending) firmware's manifest would no
        longer verify under the new list: re-sign and ship a release first.
        """
        store = self.bootloader.trust()
        new = store.apply_update(update, self.clock())
        signer = keylist_signer(store, update)
        if signer != store.root:
            TrustStore.restore(new.root, new.keylist.raw, signer, latest_time=new.latest_time)
        st = self.bootloader.bootstate.load()
        for idx in (st.active, st.pending):
            if idx is None:
                continue
            try:
                slot_manifest(self.flash, self.layout.slots[idx], new)
            except OtaError as err:
                if err.code == ErrorCode.POWER_CUT:
                    raise
                raise DeviceError(
                    ErrorCode.WOULD_BRICK,
                    f"firmware in slot {'AB'[idx]} would not verify under key list "
                    f"v{new.version} ({err.code.value})",
                ) from None
        self.storage.save_trust(new, signer)
        self.storage.advance(keylist_version=new.version)
        return new.version

    # --- bookkeeping -------------------------------------------------------------------------
    def _suspect(self, transport: Transport, err: OtaError) -> None:
        state = self.storage.agent_state()
        entry = {"endpoint": endpoint_of(transport), "code": err.code.value, "at": self.clock()}
        self.storage.write_agent_state(replace(state, suspects=(*state.suspects, entry)))

    def _report_suspects(self, transport: Transport) -> None:
        state = self.storage.agent_state()
        if not state.suspects:
            return
        try:
            transport.report({"event": "suspect-sources", "suspects": list(state.suspects)})
        except OtaError as err:
            if err.code == ErrorCode.POWER_CUT:
                raise
            return  # try again at the next check-in
        self.storage.write_agent_state(replace(state, suspects=()))

    def _fail(self, transport: Transport, err: OtaError) -> OtaError:
        state = self.storage.agent_state()
        self.storage.write_agent_state(
            replace(state, last_error=err.code.value, last_detail=err.detail)
        )
        self._report(transport, {"event": "error", **err.to_dict()})
        return err

    def _report(self, transport: Transport, event: dict[str, Any]) -> None:
        try:
            transport.report(event)
        except OtaError as err:
            if err.code == ErrorCode.POWER_CUT:
                raise
