"""The application's health check, which decides confirm or revert after a test boot.

A self-test is any ``Callable[[BootResult], bool]``; :func:`command_self_test` adapts a shell
command (exit status 0 = healthy) so a Linux-class device can plug in its own script. A
command that hangs past its timeout or cannot be started counts as a failure: an update that
cannot prove itself healthy must not become permanent.
"""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Callable, Sequence

from .bootloader import BootResult

SelfTest = Callable[[BootResult], bool]


def constant(result: bool) -> SelfTest:
    def check(_: BootResult) -> bool:
        return result

    return check


def command_self_test(argv: Sequence[str] | str, *, timeout: float = 60.0) -> SelfTest:
    args = shlex.split(argv) if isinstance(argv, str) else list(argv)
    if not args:
        raise ValueError("empty self-test command")

    def check(boot: BootResult) -> bool:
        env = dict(os.environ)
        env["OTAGUARD_SLOT"] = boot.slot_name
        env["OTAGUARD_VERSION"] = boot.version
        try:
            proc = subprocess.run(args, env=env, timeout=timeout, capture_output=True, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return False
        return proc.returncode == 0

    return check


def settle_test_boot(
    boot: BootResult | None,
    test: SelfTest,
    confirm: Callable[[], None],
    reject: Callable[[], None],
) -> str:
    """The one confirm-or-revert decision after a test boot, for every device backend.

    Returns ``not-in-test`` (nothing to decide), ``confirmed`` or ``reverted``."""
    if boot is None or boot.mode != "test":
        return "not-in-test"
    if test(boot):
        confirm()
        return "confirmed"
    reject()
    return "reverted"
