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

Delta releases (docs/delta.md): a manifest with a delta part whose base digest is the ACTIVE
slot's image digest is applied as a stream — patch bytes from the transport, old bytes read
from the active slot, the new image written into the inactive slot — and must reproduce the
signed final digest. A delta apply is never resumed, always restarted from patch byte 0 (the
decoder state is not persisted; only the inactive slot is written, so a restart is safe). When
a transport offers a delta *and* the full image (:class:`~.transport.DeltaSource`), a failed
delta is reported (``delta-failed``), the inactive slot is erased and the full image installed.

The running firmware is never touched: only the inactive slot and the staging record are
written until the final boot-state write that marks the slot pending.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

from ..crypto.algorithms import StreamingHasher
from ..delta import PatchApplier
from ..errors import DeltaError, DeviceError, ErrorCode, OtaError
from ..manifest.conditions import DeviceFacts, check_applicable
from ..manifest.verify import VerifiedManifest, verify_envelope
from ..trust.store import TrustStore
from .bootloader import Bootloader, running_manifest, verify_slot
from .hal import Slot, SlotMedia
from .slots import envelope_ref
from .storage import SecureStorage, Staging, keylist_signer
from .transport import Transport, endpoint_of

DEFAULT_CHECKPOINT = 64 * 1024
PATCH_RESUMES = 3  # in-RAM resumes of a dropped patch download within one apply
Clock = Callable[[], int | None]


def system_clock() -> int | None:
    return int(time.time())


@dataclass(frozen=True)
class InstallResult:
    slot: int
    version: str
    resumed_from: int
    image_size: int
    method: str = "full"  # "full" or "delta"
    bytes_received: int = 0  # image or patch bytes fetched by this call
    delta_error: str | None = None  # code of a delta attempt that fell back to the full image

    def as_dict(self) -> dict[str, Any]:
        return {
            "slot": "AB"[self.slot],
            "version": self.version,
            "resumed_from": self.resumed_from,
            "image_size": self.image_size,
            "method": self.method,
            "bytes_received": self.bytes_received,
            "delta_error": self.delta_error,
            "next": "reboot to test-boot the new image",
        }


class UpdateAgent:
    def __init__(
        self,
        slots: SlotMedia,
        storage: SecureStorage,
        bootloader: Bootloader,
        *,
        clock: Clock = system_clock,
        checkpoint: int = DEFAULT_CHECKPOINT,
        progress: Callable[[Slot, int, int], None] | None = None,
    ) -> None:
        """``progress(slot, bytes_committed, image_size)`` is told at every checkpoint (the
        Linux agent logs it; a power-cut test waits for it)."""
        unit = slots.unit
        if checkpoint < unit or checkpoint % unit:
            raise DeviceError(ErrorCode.USAGE, "checkpoint must be a multiple of the sector size")
        self.slots = slots
        self.progress = progress
        self.storage = storage
        self.bootloader = bootloader
        self.clock = clock
        self.checkpoint = checkpoint

    # --- install ------------------------------------------------------------------------------
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
        slot = self.slots.slots[st.inactive]
        delta_error: str | None = None
        if callable(getattr(transport, "fetch_delta_manifest", None)):
            offered = self._try_offered_delta(transport, store, st.active, slot, now)
            if isinstance(offered, InstallResult):
                return offered
            delta_error = offered
        vm = self._fetch_and_verify(transport, store, now)
        # Refusals by the manifest alone (conditions, slot size, delta base) leave the inactive
        # slot as it was: it may hold the fallback image.
        touched = False
        try:
            running = self._check(vm, store, st.active, slot, now)
            if vm.info.delta is not None:
                self._check_delta(vm, running)
                touched = True
                result = self._apply_delta(transport, vm, store, slot, st.active, running)
            else:
                touched = True
                result = self._download(transport, vm, store, slot)
        except OtaError as err:
            if err.code in (ErrorCode.POWER_CUT, ErrorCode.TRANSPORT):
                # Power cut: nothing to do (simulation). Drop: keep the staging to resume.
                if err.code == ErrorCode.TRANSPORT:
                    self._fail(transport, err)
                raise
            if touched:
                self._abort(slot, vm.info.image_size)
            raise self._fail(transport, err) from None
        return replace(result, delta_error=delta_error)

    def _try_offered_delta(
        self,
        transport: Transport,
        store: TrustStore,
        active: int,
        slot: Slot,
        now: int | None,
    ) -> InstallResult | str | None:
        """Install the transport's delta offer; on refusal return its code (fall back to full).

        None: no delta offered. Power cuts propagate (the device reboots); anything else —
        including a signature failure of the delta manifest or a network drop — is reported
        as ``delta-failed``, the inactive slot is erased if it was written, and the caller
        continues with the full image, whose manifest is verified on its own.
        """
        fetch = transport.fetch_delta_manifest  # type: ignore[attr-defined]
        wrote = False
        size = 0
        try:
            raw = fetch()
            if raw is None:
                return None
            try:
                vm = verify_envelope(raw, store, now=now)
            except OtaError as err:
                del raw
                if err.code != ErrorCode.POWER_CUT:
                    self._suspect(transport, err)
                raise
            if vm.info.delta is None:
                raise DeviceError(ErrorCode.MALFORMED, "delta offer is not a delta manifest")
            size = vm.info.image_size
            running = self._check(vm, store, active, slot, now)
            self._check_delta(vm, running)
            wrote = True
            return self._apply_delta(transport, vm, store, slot, active, running)
        except OtaError as err:
            if err.code == ErrorCode.POWER_CUT:
                raise
            if wrote:
                self._abort(slot, size)
            state = self.storage.agent_state()
            self.storage.write_agent_state(
                replace(state, last_error=err.code.value, last_detail=err.detail)
            )
            self._report(transport, {"event": "delta-failed", **err.to_dict()})
            return err.code.value

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
        slot: Slot,
        now: int | None,
    ) -> VerifiedManifest:
        """Applicability checks; returns the running (active) slot's verified manifest."""
        otp = self.storage.require_otp()
        counters = self.storage.counters()
        # The running image is known by its boot record, not re-verified: its signing key may
        # have been rotated out or revoked since it was installed (a security patch signed
        # with the new key must still install over it).
        running = running_manifest(self.slots, self.bootloader.bootstate.load(), store)
        facts = DeviceFacts(
            vendor_id=otp.vendor_id,
            class_id=otp.class_id,
            running_version=running.info.version,
            security_counter=counters.security,
            last_sequence=counters.sequence,
            now=now,
        )
        check_applicable(vm.info, facts)
        if vm.info.image_size > slot.image_capacity:
            raise DeviceError(
                ErrorCode.SLOT_FULL,
                f"image of {vm.info.image_size} bytes exceeds slot {slot.name} "
                f"({slot.image_capacity} bytes)",
            )
        if len(vm.envelope) > self.slots.manifest_capacity(slot):
            raise DeviceError(ErrorCode.TOO_LARGE, "manifest exceeds the slot's manifest area")
        return running

    @staticmethod
    def _check_delta(vm: VerifiedManifest, running: VerifiedManifest) -> None:
        d = vm.info.delta
        assert d is not None
        if (
            running.info.digest_alg != vm.info.digest_alg
            or d.base_digest != running.info.image_digest
        ):
            raise DeltaError(
                ErrorCode.DELTA_BASE,
                f"delta applies to base {d.base_digest.hex()[:16]}…, the running image is "
                f"{running.info.image_digest.hex()[:16]}…",
            )

    def _download(
        self, transport: Transport, vm: VerifiedManifest, store: TrustStore, slot: Slot
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
            self.slots.invalidate(slot)
        writer = self.slots.writer(slot, info.image_size, info.digest_alg, start=start)
        saved = writer.committed
        for chunk in transport.open_image(start):
            writer.write(chunk)
            if writer.committed - saved >= self.checkpoint:
                saved = writer.committed
                self.storage.write_staging(Staging(slot.index, ref, saved, info.image_size))
                if self.progress is not None:
                    self.progress(slot, saved, info.image_size)
        digest = writer.finish()
        if digest != info.image_digest:
            raise DeviceError(ErrorCode.IMAGE_DIGEST, "image digest does not match the manifest")
        self._commit(transport, vm, store, slot)
        return InstallResult(
            slot.index, info.version, start, info.image_size, "full", writer.position - start
        )

    def _apply_delta(
        self,
        transport: Transport,
        vm: VerifiedManifest,
        store: TrustStore,
        slot: Slot,
        active: int,
        running: VerifiedManifest,
    ) -> InstallResult:
        """Stream the patch: old bytes from the active slot, new bytes into ``slot``.

        Always from the beginning: the staging record names this manifest with 0 bytes
        committed, so a reboot mid-apply restarts it (never resumes). A dropped patch download
        is resumed in RAM (Range from the bytes already fed) up to PATCH_RESUMES times.
        """
        info = vm.info
        d = info.delta
        assert d is not None
        open_patch = getattr(transport, "open_patch", None)
        if not callable(open_patch):
            raise DeviceError(ErrorCode.UNSUPPORTED, "this update source cannot provide a patch")
        ref = envelope_ref(vm.envelope)
        self.storage.write_staging(Staging(slot.index, ref, 0, info.image_size))
        self.slots.invalidate(slot)
        writer = self.slots.writer(slot, info.image_size, info.digest_alg)
        applier = PatchApplier(
            self.slots.reader(self.slots.slots[active]),
            writer.write,
            old_size=running.info.image_size,
            max_new=slot.image_capacity,
            expected_base_digest=d.base_digest,
            expected_new_digest=info.image_digest,
            digest_alg=info.digest_alg,
        )
        hasher = StreamingHasher(info.digest_alg)
        received = 0
        drops = 0
        while True:
            try:
                for chunk in open_patch(received):
                    if received + len(chunk) > d.patch_size:
                        raise DeltaError(
                            ErrorCode.DELTA_CORRUPT,
                            f"patch is longer than the {d.patch_size} bytes the manifest says",
                        )
                    hasher.update(chunk)
                    received += len(chunk)
                    applier.feed(chunk)
                break
            except OtaError as err:
                if err.code != ErrorCode.TRANSPORT or drops >= PATCH_RESUMES:
                    raise
                drops += 1
        if received != d.patch_size:
            raise DeltaError(
                ErrorCode.DELTA_CORRUPT, f"patch ended after {received} of {d.patch_size} bytes"
            )
        if hasher.digest() != d.patch_digest:
            raise DeltaError(ErrorCode.DELTA_CORRUPT, "patch does not match its signed digest")
        applier.finish()
        if writer.finish() != info.image_digest:
            raise DeviceError(ErrorCode.IMAGE_DIGEST, "image digest does not match the manifest")
        self._commit(transport, vm, store, slot)
        return InstallResult(slot.index, info.version, 0, info.image_size, "delta", received)

    def _commit(
        self, transport: Transport, vm: VerifiedManifest, store: TrustStore, slot: Slot
    ) -> None:
        """The image is in ``slot`` and hashed: store the envelope, re-verify, mark pending."""
        ref = envelope_ref(vm.envelope)
        self.slots.write_envelope(slot, vm.envelope)
        # Read back from the slot: the running hash proved the transport, this proves the medium.
        verify_slot(
            self.slots,
            slot,
            store,
            self.storage.require_otp(),
            self.storage.counters(),
            ref=ref,
        )
        st = self.bootloader.bootstate.load()
        self.bootloader.bootstate.save(st.with_pending(slot.index, ref))
        self.bootloader.control.pending(slot.index, st.active)
        self.storage.write_staging(None)
        state = self.storage.agent_state()
        if state.last_error is not None:
            self.storage.write_agent_state(replace(state, last_error=None, last_detail=""))
        self._report(transport, {"event": "installed", "version": vm.info.version})

    def _abort(self, slot: Slot, size: int) -> None:
        """Erase staging: the slot's manifest and whatever image bytes were written."""
        self.slots.discard(slot, size)
        self.storage.write_staging(None)

    # --- key-list updates --------------------------------------------------------------------
    def apply_keylist_update(self, update: bytes) -> int:
        """Verify and persist a key-list update; returns the new key-list version.

        Atomic (one power-cut-safe record write, then the monotonic counter) and version
        monotonic (E_REPLAY). The running firmware is not re-checked against the new list: it
        boots from its boot record, so revoking the key that signed it is allowed (and is
        exactly what an emergency revocation does). A staged or pending image signed with a
        key the new list revokes fails its full verification at resume or boot.
        """
        store = self.bootloader.trust()
        new = store.apply_update(update, self.clock())
        signer = keylist_signer(store, update)
        if signer != store.root:
            # What we persist must reload: prove it before writing.
            TrustStore.restore(new.root, new.keylist.raw, signer, latest_time=new.latest_time)
        self.storage.save_trust(new, signer)
        self.storage.advance(keylist_version=new.version)
        if new.keylist.revoked - store.keylist.revoked:
            # A revocation: forget any half-finished download instead of resuming it later.
            # (A resume re-verifies its manifest anyway; this just drops the bytes at once.)
            self.storage.write_staging(None)
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
