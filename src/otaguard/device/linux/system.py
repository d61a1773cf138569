"""A Linux device assembled from its config: block-device slots, state files, boot control
(GRUB or U-Boot, :func:`open_env`).

It offers what :class:`~..updater.Updater` uses of the simulated :class:`~..device.Device`
(``boot``, ``run_self_test``, ``install``, ...), so the same polling cycle drives both. The
one difference is physical: a simulated reboot is a function call, a real one ends this
process. :meth:`LinuxDevice.boot` therefore raises :class:`RebootRequested` whenever the slot
that should run is not the one running; the service reboots the machine and the next boot's
``agent boot-check`` (:meth:`assess`) carries on from the persisted state.

What the boot check decided for this power-on is kept in the run directory (a tmpfs: RAM
semantics, gone at the next reset), tagged with the kernel's boot id, so ``mark-good`` and
``agent run`` know whether this is a test boot.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ...errors import DeviceError, ErrorCode, OtaError
from ...fsutil import atomic_write
from ...manifest.verify import decode_pinned
from ..agent import Clock, InstallResult, UpdateAgent, system_clock
from ..bootloader import Bootloader, BootResult
from ..device import Provisioning, checkin_facts, device_status, provision
from ..hal import Slot
from ..https_transport import KeyLoader, load_key_file
from ..renewal import KeyMaker, software_key
from ..selftest import SelfTest, settle_test_boot
from ..slots import envelope_ref
from ..storage import SecureStorage
from ..transport import Transport
from .blockslots import BlockSlots
from .config import AgentConfig
from .envstore import EnvStore
from .filestore import FileOtp, FileRecord, check_state_dir
from .grub import GrubBootControl, read_booted_slot
from .grubenv import GrubEnvStore, initial_env
from .uboot import UBootEnvStore

if TYPE_CHECKING:  # tpm2-pytss is the optional extra `tpm`: imported only for a TPM store
    from .tpm import Tpm, TpmStore

BOOT_RECORD = "boot.json"
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


class RebootRequested(OtaError):
    """Not a failure: the slot that must run next is not the running one."""

    default_code = ErrorCode.REBOOT


def _boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return "unknown"


def open_env(cfg: AgentConfig) -> EnvStore:
    """The boot state's home for the configured bootloader (one control logic for both)."""
    if cfg.bootloader == "uboot":
        return UBootEnvStore(cfg.fw_env_config)
    return GrubEnvStore(cfg.grubenv)


def open_storage(state_dir: Path, tpm: TpmStore | None = None) -> SecureStorage:
    """Records are files either way; with a TPM, OTP is its locked NV index and its NV
    counters are the floor of the counter record (tpm.py)."""
    return SecureStorage(
        FileOtp(state_dir / "otp") if tpm is None else tpm,
        lambda name, key: FileRecord(state_dir / f"{name}.rec", key=key),
        floor=tpm,
    )


FILE_STORE_NOTE = "no TPM: counters, root-key hash and identity key are files on the data partition"


class LinuxDevice:
    def __init__(
        self,
        cfg: AgentConfig,
        *,
        clock: Clock = system_clock,
        running: int | None = None,
        provisioning: bool = False,
        progress: Callable[[Slot, int, int], None] | None = None,
        tpm_owner_auth: bytes | None = None,
    ) -> None:
        """``running``: the slot GRUB started (default: from the kernel command line).
        ``provisioning``: the factory writes slot A from outside, so nothing is protected.
        ``tpm_owner_auth``: the TPM owner password, for provisioning only."""
        check_state_dir(cfg.state_dir)
        self.tpm: Tpm | None = None
        self.tpm_store: TpmStore | None = None
        if cfg.store == "tpm":
            from .tpm import Tpm, TpmStore

            # Configured on the (verified) root file system, never found on the data
            # partition: a device set up for a TPM refuses to run without it (E_TPM*).
            self.tpm = Tpm(cfg.tpm_tcti)
            self.tpm_store = TpmStore(self.tpm, owner_auth=tpm_owner_auth)
        self.cfg = cfg
        self.running = read_booted_slot(cfg.cmdline) if running is None else running
        self.env = open_env(cfg)
        self.slots = BlockSlots.from_specs(
            cfg.slot_a, cfg.slot_b, cfg.state_dir, on_invalidate=self._disable
        )
        if not provisioning:
            self.slots.protect(self.running)
        self.storage = open_storage(cfg.state_dir, self.tpm_store)
        if self.tpm_store is not None and not provisioning:
            self.tpm_store.floor()  # anchor and counters as provisioned, or E_TPM_NV now
        self.control = GrubBootControl(
            self.env,
            running=self.running,
            max_tries=cfg.max_tries,
            has_image=lambda i: self.slots.read_envelope(self.slots.slots[i]) is not None,
        )
        self.bootloader = Bootloader(
            self.slots, self.storage, max_tries=cfg.max_tries, control=self.control
        )
        self.agent = UpdateAgent(
            self.slots,
            self.storage,
            self.bootloader,
            clock=clock,
            checkpoint=cfg.checkpoint,
            progress=progress,
        )
        if not provisioning:
            self.bootloader.current = self._load_boot_record()

    def _disable(self, index: int) -> None:
        self.control.disable(index)

    # --- factory -----------------------------------------------------------------------------
    def provision(self, prov: Provisioning, image: Iterable[bytes]) -> None:
        provision(self.storage, self.slots, self.bootloader, prov, image)
        self.env.write(initial_env(0))

    # --- the boot check ------------------------------------------------------------------------
    def assess(self) -> BootResult:
        """First-boot verification, run before anything else on every boot."""
        result = self.bootloader.boot()
        self._save_boot_record(result)
        if result.reverted is not None:
            # The server learns of a boot-time revert (watchdog, a slot that failed its
            # verification) from the queued report, sent by the next `agent run`.
            write_outbox(
                self.cfg.state_dir,
                {"event": "reverted", "error": result.reverted, "version": result.version},
            )
        if result.slot != self.running:
            raise RebootRequested(
                ErrorCode.REBOOT,
                f"slot {'AB'[self.running]} must not run; rebooting into slot {result.slot_name}",
            )
        return result

    def boot(self) -> BootResult:
        """Power-on (the boot check) if it has not run yet; otherwise a reboot is wanted."""
        if self.bootloader.current is None:
            return self.assess()
        raise RebootRequested(ErrorCode.REBOOT, "rebooting to start the installed image")

    def confirm(self) -> None:
        self.bootloader.confirm()
        assert self.bootloader.current is not None
        self._save_boot_record(self.bootloader.current)

    def reject(self, reason: ErrorCode = ErrorCode.SELF_TEST) -> None:
        self.bootloader.reject(reason)
        (self.cfg.run_dir / BOOT_RECORD).unlink(missing_ok=True)

    def run_self_test(self, test: SelfTest) -> str:
        """After a test boot: run the health check, confirm or revert. Returns the outcome."""
        return settle_test_boot(self.bootloader.current, test, self.confirm, self.reject)

    def install(self, transport: Transport) -> InstallResult:
        # GRUB must be able to read what the install will tell it: with no valid env copy it
        # would start its built-in default, whatever the agent writes. Refuse before anything
        # is written (the next boot check rewrites the env from the boot state).
        self.env.read()
        return self.agent.install(transport)

    def apply_keylist_update(self, update: bytes) -> int:
        return self.agent.apply_keylist_update(update)

    def checkin_facts(self) -> dict[str, Any]:
        return checkin_facts(self.storage, self.bootloader, self.slots)

    def status(self) -> dict[str, Any]:
        out = device_status(self.storage, self.bootloader, self.slots)
        cur = self.bootloader.current
        out["running_slot"] = "AB"[self.running]
        out["boot"] = None if cur is None else {"slot": cur.slot_name, "mode": cur.mode}
        if self.tpm is None:
            out["storage"] = "file"
            out["storage_note"] = FILE_STORE_NOTE
        else:
            out["storage"] = "tpm"
            out["tpm"] = {"tcti": self.tpm.tcti, "identity_key": self._identity_in_tpm()}
        kind = self.cfg.bootloader
        try:
            env = self.env.read(repair=False)
            out["bootloader"] = {
                "type": kind,
                "order": list(env.order),
                "states": list(env.states),
                "tries": list(env.tries),
            }
        except OtaError as err:
            out["bootloader"] = {"type": kind, "error": err.code.value}
        return out

    # --- the TPM-held identity ----------------------------------------------------------------
    def _identity_in_tpm(self) -> bool:
        from .tpm import is_tpm_key

        ident = self.storage.identity()
        return ident is not None and is_tpm_key(ident.device_key)

    def key_loader(self) -> KeyLoader:
        """How the TLS client gets this device's key: a key file, or signatures from the TPM.
        A TPM device never presents a key that is not TPM-held."""
        if self.tpm is None:
            return load_key_file
        from .tpmtls import tpm_key_loader

        return tpm_key_loader(self.tpm)

    def renewal_key_maker(self) -> KeyMaker:
        """Renewed keys are made where the identity key lives: in software, or in the TPM."""
        if self.tpm is None:
            return software_key
        from .tpmtls import tpm_key_maker

        return tpm_key_maker(self.tpm)

    # --- what this power-on's boot check decided -----------------------------------------------
    def _save_boot_record(self, result: BootResult) -> None:
        st = self.bootloader.bootstate.load()
        ref = st.refs[result.slot]
        rec = {
            "boot_id": _boot_id(),
            "slot": result.slot,
            "mode": result.mode,
            "reverted": result.reverted,
            "ref": None if ref is None else ref.hex(),
        }
        try:
            self.cfg.run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write(self.cfg.run_dir / BOOT_RECORD, json.dumps(rec).encode(), mode=0o600)
        except OSError as exc:
            raise DeviceError(ErrorCode.STORAGE, f"cannot write the boot record: {exc}") from None

    def _load_boot_record(self) -> BootResult | None:
        try:
            rec = json.loads((self.cfg.run_dir / BOOT_RECORD).read_text())
            if rec["boot_id"] != _boot_id() or rec["slot"] != self.running:
                return None
            slot = self.slots.slots[int(rec["slot"])]
            env = self.slots.read_envelope(slot)
            if env is None or rec["ref"] is None or envelope_ref(env).hex() != rec["ref"]:
                return None
            mode = rec["mode"]
            if mode not in ("normal", "test"):
                return None
            return BootResult(slot.index, mode, decode_pinned(env).info, rec["reverted"])
        except (OSError, ValueError, KeyError, TypeError, IndexError, OtaError):
            return None


def write_outbox(state_dir: Path, event: dict[str, Any]) -> None:
    """Queue an event for the server (``mark-good`` runs before the network is needed)."""
    path = state_dir / "outbox.jsonl"
    line = (json.dumps(event, sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def drain_outbox(state_dir: Path, send: Callable[[dict[str, Any]], None]) -> int:
    """Send queued events in order; the file goes only after all of them were sent."""
    path = state_dir / "outbox.jsonl"
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return 0
    sent = 0
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue  # a torn last line after a power cut
        if isinstance(event, dict):
            send(event)
            sent += 1
    path.unlink(missing_ok=True)
    return sent
