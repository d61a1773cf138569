"""What a bootloader-backed boot control needs of its firmware's environment.

GRUB (:mod:`.grubenv`: two env block files) and U-Boot (:mod:`.uboot`: a redundant U-Boot
environment through libubootenv) store the same variables (:class:`~.grubenv.BootEnv`) in
two copies; only the storage differs. :class:`~.grub.GrubBootControl` decides what to write
and talks to either through this interface, so the boot-control decisions stay one path.
"""

from __future__ import annotations

from typing import Protocol

from .grubenv import BootEnv


class EnvStore(Protocol):
    def read(self, *, repair: bool = True) -> BootEnv:
        """The decision in force (what the firmware reads); E_BOOT_ENV when there is none.
        ``repair``: a store that can rewrite a lost or stale copy from the other may do so."""
        ...

    def write(self, env: BootEnv) -> BootEnv:
        """Store ``env`` under the next sequence number so that a power cut at any point
        leaves the old or the new decision readable. Returns what was stored."""
        ...
