"""The Linux device backend: block-device slots, files on a data partition, GRUB boot control.

Everything here implements :mod:`otaguard.device.hal`; the verification sequence itself is the
one in :mod:`otaguard.device.agent` and :mod:`otaguard.device.bootloader`. See
``docs/device-linux.md``.
"""
