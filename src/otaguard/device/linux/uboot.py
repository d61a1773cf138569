"""The boot state in a redundant U-Boot environment, for the shipped ``files/boot.cmd``.

The agent reads and writes it only through libubootenv's own tools (``fw_printenv`` /
``fw_setenv``, Debian ``libubootenv-tool``) with a ``fw_env.config`` of two lines: two
copies of ``CRC-32 | flags | NAME=value\\0...``. ``fw_setenv`` writes the copy that is *not*
current with flags + 1, so one write replaces one copy: a power cut during it leaves that copy
with a wrong CRC and the other one, the previous decision, in force, for U-Boot and for the
tools alike (both take the newer valid copy by its flags). Nothing is left to repair: the
next write goes to the torn copy again.

The variables are GRUB's (:class:`~.grubenv.BootEnv`, with its ``OG_SUM`` integrity check),
so :class:`~.grub.GrubBootControl` decides for both bootloaders. boot.cmd only ever rewrites
``OG_x_TRIES``, in place, in the copy it read (see the note in boot.cmd on why in place).
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from ...errors import DeviceError, ErrorCode
from .grubenv import BootEnv

FW_PRINTENV = "fw_printenv"
FW_SETENV = "fw_setenv"
TOOL_TIMEOUT = 60.0
MAX_CONFIG = 4096


@dataclass(frozen=True)
class EnvCopy:
    """One line of fw_env.config: where a copy lives."""

    device: Path
    offset: int
    size: int


def parse_fw_env_config(text: str, source: str = "fw_env.config") -> tuple[EnvCopy, EnvCopy]:
    """The two copies of a redundant environment; E_CONFIG unless there are exactly two of
    the same size (one copy would make every write a torn-write risk)."""
    copies: list[EnvCopy] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) < 3:
            raise DeviceError(ErrorCode.CONFIG, f"{source}:{n}: want 'device offset size'")
        try:
            offset, size = int(fields[1], 0), int(fields[2], 0)
        except ValueError:
            raise DeviceError(ErrorCode.CONFIG, f"{source}:{n}: offset/size not numbers") from None
        if offset < 0 or not 16 <= size <= 1 << 20:
            raise DeviceError(ErrorCode.CONFIG, f"{source}:{n}: offset/size out of range")
        copies.append(EnvCopy(Path(fields[0]), offset, size))
    if len(copies) != 2 or copies[0].size != copies[1].size:
        raise DeviceError(
            ErrorCode.CONFIG,
            f"{source}: a redundant environment needs exactly two copies of the same size",
        )
    a, b = copies
    if a.device == b.device and abs(a.offset - b.offset) < a.size:
        raise DeviceError(ErrorCode.CONFIG, f"{source}: the two copies overlap")
    return a, b


class UBootEnvStore:
    """:class:`~.envstore.EnvStore` over libubootenv with the config file ``config``."""

    def __init__(
        self,
        config: Path,
        *,
        printenv: str = FW_PRINTENV,
        setenv: str = FW_SETENV,
    ) -> None:
        self.config = config
        self.printenv = printenv
        self.setenv = setenv
        self._copies: tuple[EnvCopy, EnvCopy] | None = None

    def copies(self) -> tuple[EnvCopy, EnvCopy]:
        """The config's two copies, parsed at first use (so ``agent status`` can still
        report a missing or broken config as the bootloader's error)."""
        if self._copies is None:
            try:
                raw = self.config.read_bytes()[: MAX_CONFIG + 1]
            except OSError as exc:
                raise DeviceError(
                    ErrorCode.BOOT_ENV, f"cannot read {self.config}: {exc.strerror}"
                ) from None
            if len(raw) > MAX_CONFIG:
                raise DeviceError(
                    ErrorCode.CONFIG, f"{self.config} is larger than {MAX_CONFIG} bytes"
                )
            self._copies = parse_fw_env_config(raw.decode("utf-8", "replace"), str(self.config))
        return self._copies

    def _run(self, argv: list[str]) -> str:
        try:
            proc = subprocess.run(
                argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT, check=False
            )
        except FileNotFoundError:
            raise DeviceError(
                ErrorCode.BOOT_ENV, f"{argv[0]} not found (Debian package libubootenv-tool)"
            ) from None
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DeviceError(ErrorCode.BOOT_ENV, f"{argv[0]} failed: {exc}") from None
        if proc.returncode != 0:
            why = " ".join(proc.stderr.split())[:200] or f"exit status {proc.returncode}"
            raise DeviceError(ErrorCode.BOOT_ENV, f"{argv[0]} -c {self.config}: {why}")
        return proc.stdout

    def variables(self) -> dict[str, str]:
        """Every variable of the copy in force; E_BOOT_ENV when no copy is valid."""
        self.copies()  # a config that is not two copies is refused before the tool runs
        out: dict[str, str] = {}
        for line in self._run([self.printenv, "-c", str(self.config)]).splitlines():
            name, eq, value = line.partition("=")
            if eq:
                out[name] = value
        return out

    def read(self, *, repair: bool = True) -> BootEnv:
        """The copy in force as a :class:`BootEnv`. ``repair`` has nothing to do here: a
        stale copy is the fallback by design and a torn one is the next write's target."""
        return BootEnv.from_variables(self.variables())

    def write(self, env: BootEnv) -> BootEnv:
        """One ``fw_setenv`` of every variable (one copy written), synced, then read back."""
        self.copies()  # never let fw_setenv write through a config that is not two copies
        try:
            seq = self.read().seq + 1
        except DeviceError:
            seq = env.seq + 1
        new = replace(env, seq=max(seq, env.seq + 1))
        script = "".join(f"{k}={v}\n" for k, v in new.variables().items())
        with tempfile.NamedTemporaryFile("w", prefix="otaguard-env-", suffix=".txt") as f:
            f.write(script)
            f.flush()
            # -f: the same variables are the defaults when no copy is valid yet (a blank
            # device at the factory); fw_setenv refuses to write without any.
            self._run([self.setenv, "-c", str(self.config), "-f", f.name, "-s", f.name])
        self._sync()
        got = self.read()
        if got != new:
            raise DeviceError(ErrorCode.BOOT_ENV, f"{self.setenv} did not store the boot state")
        return new

    def _sync(self) -> None:
        """Make the copy fw_setenv wrote durable before anything depends on it."""
        for dev in {c.device for c in self.copies()}:
            try:
                fd = os.open(dev, os.O_RDONLY)
            except OSError as exc:
                raise DeviceError(
                    ErrorCode.BOOT_ENV, f"cannot open {dev}: {exc.strerror}"
                ) from None
            try:
                os.fsync(fd)
            except OSError as exc:
                raise DeviceError(
                    ErrorCode.BOOT_ENV, f"cannot sync {dev}: {exc.strerror}"
                ) from None
            finally:
                os.close(fd)
