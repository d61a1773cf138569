"""Boot control through GRUB (:class:`~..hal.BootControl`): the shipped ``files/grub.cfg``
reads the two env copies of :mod:`.grubenv`, counts a pending slot's tries down itself, and
falls back to the other slot when they run out, with no help from a running system.

The same class drives U-Boot (``files/boot.cmd``): it is given a :class:`~.uboot.UBootEnvStore`
instead of a :class:`~.grubenv.GrubEnvStore` (both :class:`~.envstore.EnvStore`); the
variables, and so every decision, are the same.

Every decision is one :meth:`~.grubenv.GrubEnvStore.write` (all variables of a switch in one
block per copy). The slot GRUB actually started is read from the kernel command line
(``otaguard.slot=A|B``, set by grub.cfg), so :mod:`..bootloader` judges what really runs.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ...errors import DeviceError, ErrorCode
from ..bootstate import BootState
from .envstore import EnvStore
from .grubenv import SLOTS, BootEnv, initial_env

CMDLINE_KEY = "otaguard.slot="


def booted_slot(cmdline: str) -> int:
    """The slot GRUB started, from ``/proc/cmdline``; E_BOOT_ENV when GRUB did not say."""
    found = [w.removeprefix(CMDLINE_KEY) for w in cmdline.split() if w.startswith(CMDLINE_KEY)]
    if len(found) != 1 or found[0] not in SLOTS:
        raise DeviceError(
            ErrorCode.BOOT_ENV,
            "kernel command line names no otaguard slot (not booted by grub.cfg or boot.cmd)",
        )
    return SLOTS.index(found[0])


def read_booted_slot(path: Path = Path("/proc/cmdline")) -> int:
    try:
        text = path.read_text()
    except OSError as exc:
        raise DeviceError(ErrorCode.BOOT_ENV, f"cannot read {path}: {exc.strerror}") from None
    return booted_slot(text)


class GrubBootControl:
    def __init__(
        self,
        store: EnvStore,
        *,
        running: int,
        max_tries: int,
        has_image: Callable[[int], bool],
    ) -> None:
        """``has_image(slot)``: the slot still holds an installed envelope (else it is bad)."""
        self.store = store
        self.running = running
        self.max_tries = max_tries
        self.has_image = has_image

    def _current(self) -> BootEnv:
        try:
            return self.store.read()
        except DeviceError:
            return initial_env(self.running)

    def chosen(self, st: BootState) -> int:
        return self.running

    def pending(self, slot: int, active: int) -> None:
        env = self._current().first(slot).with_slot(slot, "pending", self.max_tries)
        self.store.write(env.with_slot(active, "good"))

    def confirmed(self, slot: int) -> None:
        other = 1 - slot
        env = self._current().first(slot).with_slot(slot, "good")
        self.store.write(env.with_slot(other, "good" if self.has_image(other) else "bad"))

    def reverted(self, slot: int, active: int) -> None:
        env = self._current().first(active).with_slot(active, "good")
        self.store.write(env.with_slot(slot, "bad"))

    def disable(self, slot: int) -> None:
        """Take ``slot`` out of rotation before its contents change (an install starts)."""
        env = self._current()
        if env.state(slot) == "bad" and env.order[0] != "AB"[slot]:
            return
        self.store.write(env.first(1 - slot).with_slot(slot, "bad"))

    def desired(self, st: BootState) -> BootEnv:
        """The env ``st`` implies, tries aside (GRUB owns the count-down)."""
        env = self._current()
        if st.pending is not None:
            env = env.first(st.pending).with_slot(
                st.pending,
                "pending",
                env.tries[st.pending] if env.state(st.pending) == "pending" else self.max_tries,
            )
        else:
            env = env.first(st.active)
        env = env.with_slot(st.active, "good")
        other = 1 - st.active
        if other != st.pending:
            ok = st.refs[other] is not None and self.has_image(other)
            env = env.with_slot(other, "good" if ok else "bad")
        return env

    def sync(self, st: BootState) -> None:
        try:
            cur: BootEnv | None = self.store.read()
        except DeviceError:
            cur = None
        want = self.desired(st)
        if cur is None or (cur.order, cur.states) != (want.order, want.states):
            self.store.write(want)
