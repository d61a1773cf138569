"""A simulated device assembled from a directory: ``device.json`` (layout) + ``flash.bin``.

All state lives in the flash file, so "reboot" is simply constructing a new :class:`Device`
on the same directory, exactly what the power-cut tests do after every injected cut.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import DeviceError, ErrorCode, OtaError
from ..fsutil import atomic_write, read_limited
from ..manifest.verify import verify_envelope
from ..trust.bundle import TrustBundle
from .agent import DEFAULT_CHECKPOINT, Clock, InstallResult, UpdateAgent, system_clock
from .bootloader import (
    DEFAULT_MAX_TRIES,
    Bootloader,
    BootResult,
    running_manifest,
    verify_recorded,
    verify_slot,
)
from .bootstate import BootState
from .faults import FaultInjector
from .flash import Flash
from .hal import SlotMedia
from .layout import Layout, LayoutConfig
from .selftest import SelfTest, settle_test_boot
from .slots import FlashSlots, envelope_ref
from .storage import Identity, OtpData, SecureStorage, new_huk
from .transport import Transport

DEVICE_JSON = "device.json"
FLASH_FILE = "flash.bin"
BOOTLOADER_MARKER = b"otaguard simulated bootloader v1\n"


@dataclass(frozen=True)
class Provisioning:
    """What the factory puts into a new device."""

    bundle: TrustBundle
    vendor_id: uuid.UUID
    class_id: uuid.UUID
    model: str
    hw_rev: str
    factory_manifest: bytes
    identity: Identity | None = None


def provision(
    storage: SecureStorage,
    slots: SlotMedia,
    bootloader: Bootloader,
    prov: Provisioning,
    image: Iterable[bytes],
) -> None:
    """The factory step on any backend: OTP, trust store, identity, slot A, counters, boot
    state. The factory image is verified against its signed manifest like any update."""
    store = prov.bundle.store()
    vm = verify_envelope(prov.factory_manifest, store, now=None)
    info = vm.info
    if info.vendor_id != prov.vendor_id or info.class_id != prov.class_id:
        raise DeviceError(ErrorCode.CLASS_ID, "factory manifest is for another vendor/model/hw rev")
    storage.program_otp(
        OtpData(
            prov.bundle.root_hash,
            prov.vendor_id,
            prov.class_id,
            prov.model,
            prov.hw_rev,
            new_huk(),
        )
    )
    storage.save_trust(store, prov.bundle.root)
    if prov.identity is not None:
        storage.write_identity(prov.identity)
    slot = slots.slots[0]
    writer = slots.writer(slot, info.image_size, info.digest_alg)
    for chunk in image:
        writer.write(chunk)
    if writer.finish() != info.image_digest:
        raise DeviceError(ErrorCode.IMAGE_DIGEST, "factory image does not match its manifest")
    slots.write_envelope(slot, vm.envelope)
    storage.advance(
        security=info.security_counter,
        sequence=info.sequence_number,
        keylist_version=store.version,
    )
    bootloader.bootstate.save(BootState(active=0, refs=(envelope_ref(vm.envelope), None)))


class Device:
    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        faults: FaultInjector | None = None,
        clock: Clock = system_clock,
        max_tries: int = DEFAULT_MAX_TRIES,
        checkpoint: int = DEFAULT_CHECKPOINT,
    ) -> None:
        self.dir = Path(directory)
        try:
            cfg = LayoutConfig.from_json(json.loads(read_limited(self.dir / DEVICE_JSON, 65536)))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DeviceError(ErrorCode.MALFORMED, f"bad {DEVICE_JSON}: {exc}") from None
        self.layout = Layout(cfg)
        self.flash = Flash(
            self.dir / FLASH_FILE,
            self.layout.size,
            self.layout.geometry,
            faults=faults,
            protected=self.layout.protected,
        )
        self.slots = FlashSlots(self.flash, self.layout)
        self.storage = SecureStorage.on_flash(self.flash, self.layout)
        self.bootloader = Bootloader(self.slots, self.storage, max_tries=max_tries)
        self.agent = UpdateAgent(
            self.slots,
            self.storage,
            self.bootloader,
            clock=clock,
            checkpoint=min(max(checkpoint, cfg.sector_size), cfg.slot_size),
        )

    # --- provisioning ------------------------------------------------------------------------
    @classmethod
    def create(
        cls,
        directory: str | os.PathLike[str],
        cfg: LayoutConfig,
        prov: Provisioning,
        factory_image: Iterable[bytes],
        **kwargs: Any,
    ) -> Device:
        """Manufacture a device: layout, bootloader, OTP, trust store, identity, slot A."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        if (d / DEVICE_JSON).exists() or (d / FLASH_FILE).exists():
            raise DeviceError(ErrorCode.EXISTS, f"{d} already holds a device")
        layout = Layout(cfg)
        with Flash(d / FLASH_FILE, layout.size, layout.geometry) as raw:
            raw.program_bytes(layout.bootloader.offset, BOOTLOADER_MARKER)
        atomic_write(d / DEVICE_JSON, json.dumps(cfg.to_json(), indent=2).encode())
        dev = cls(d, **kwargs)
        try:
            dev._provision(prov, factory_image)
        except BaseException:
            dev.close()
            # a half-provisioned part is scrap: leave nothing that looks like a device
            (d / DEVICE_JSON).unlink(missing_ok=True)
            (d / FLASH_FILE).unlink(missing_ok=True)
            raise
        return dev

    def _provision(self, prov: Provisioning, image: Iterable[bytes]) -> None:
        provision(self.storage, self.slots, self.bootloader, prov, image)

    # --- what a device does ------------------------------------------------------------------
    def close(self) -> None:
        self.flash.close()

    def __enter__(self) -> Device:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def boot(self) -> BootResult:
        return self.bootloader.boot()

    def confirm(self) -> None:
        self.bootloader.confirm()

    def reject(self) -> None:
        self.bootloader.reject()

    def run_self_test(self, test: SelfTest) -> str:
        """After a test boot: run the health check, confirm or revert. Returns the outcome."""
        return settle_test_boot(self.bootloader.current, test, self.confirm, self.reject)

    def install(self, transport: Transport) -> InstallResult:
        return self.agent.install(transport)

    def apply_keylist_update(self, update: bytes) -> int:
        return self.agent.apply_keylist_update(update)

    # --- status ------------------------------------------------------------------------------
    def checkin_facts(self) -> dict[str, Any]:
        """The check-in body (``HttpsTransport(status=dev.checkin_facts)``)."""
        return checkin_facts(self.storage, self.bootloader, self.slots)

    def status(self) -> dict[str, Any]:
        return device_status(self.storage, self.bootloader, self.slots)


def checkin_facts(
    storage: SecureStorage, bootloader: Bootloader, slots: SlotMedia
) -> dict[str, Any]:
    """The check-in body (``HttpsTransport(status=dev.checkin_facts)``): running version
    and counters, plus the running image's signed digest, which is what lets the server
    offer a delta whose base is this image."""
    st = bootloader.bootstate.load()
    store = bootloader.trust()
    running = running_manifest(slots, st, store)
    counters = storage.counters()
    facts: dict[str, Any] = {
        "version": running.info.version,
        "security_counter": counters.security,
        "keylist_version": store.version,
        "running_digest": running.info.image_digest.hex(),
    }
    last_error = storage.agent_state().last_error or st.last_error
    if last_error:
        facts["last_error"] = last_error
    return facts


def device_status(
    storage: SecureStorage, bootloader: Bootloader, slots: SlotMedia
) -> dict[str, Any]:
    otp = storage.require_otp()
    st = bootloader.bootstate.load()
    counters = storage.counters()
    agent = storage.agent_state()
    out: dict[str, Any] = {
        "model": otp.model,
        "hw_rev": otp.hw_rev,
        "vendor_id": str(otp.vendor_id),
        "class_id": str(otp.class_id),
        "boot_state": st.as_dict(),
        "counters": counters.as_dict(),
        "last_error": agent.last_error or st.last_error,
        "last_boot_error": st.last_error,
        "suspects": list(agent.suspects),
        "identity": storage.identity() is not None,
        "staging": None,
        "slots": [],
    }
    stg = storage.staging()
    if stg is not None:
        out["staging"] = {
            "slot": "AB"[stg.slot],
            "committed": stg.committed,
            "image_size": stg.image_size,
        }
    try:
        store = bootloader.trust()
        out["keylist_version"] = store.version
    except OtaError as err:
        out["keylist_version"] = None
        out["trust_error"] = err.code.value
        store = None
    for slot in slots.slots:
        entry: dict[str, Any] = {"slot": slot.name, "capacity": slot.image_capacity}
        ref = st.refs[slot.index]
        if store is not None or (slot.index == st.active and ref is not None):
            try:
                if slot.index == st.active and ref is not None:
                    vm = verify_recorded(slots, slot, otp, counters, ref)
                else:
                    assert store is not None
                    vm = verify_slot(slots, slot, store, otp, counters)
                entry.update(
                    valid=True,
                    version=vm.info.version,
                    security_counter=vm.info.security_counter,
                    sequence_number=vm.info.sequence_number,
                    image_size=vm.info.image_size,
                )
            except OtaError as err:
                entry.update(valid=False, error=err.code.value)
        out["slots"].append(entry)
    return out
