"""A QEMU x86_64 machine booting a disk image (tests/vm/build.py) through OVMF and GRUB.

    with Machine(disk_path, tmp_path) as m:
        m.wait_for(r"OTAGUARD-VM: slot=(\\w)", timeout=60)
        m.wait_exit(60)          # the guest's `reboot -f` makes QEMU (-no-reboot) exit

The serial console goes to a log file that ``wait_for`` reads incrementally. ``kill()`` is a
power cut (SIGKILL). Networking is QEMU user mode with ``restrict=on`` (the guest reaches
nothing but, with ``host_port``, 10.0.2.100:8443 -> 127.0.0.1:<host_port> on the host). The
host's root is shared read-only over 9p (tag ``hostroot``; the guest's init mounts it at /host
and puts tmpfs over /host/tmp and /host/run, so host files under /tmp are NOT visible there).

Acceleration: ``$OTAGUARD_VM_ACCEL`` = tcg | kvm forces one; otherwise KVM is used when
/dev/kvm is usable and a probe boot (kernel + tiny initramfs, must print a marker and exit by
itself within 30 s) succeeds; the probe result is cached in the cache directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import TracebackType

from . import build

QEMU = "qemu-system-x86_64"
GUEST_FWD_ADDR = "10.0.2.100"
GUEST_FWD_PORT = 8443
PROBE_TIMEOUT = 30.0
PROBE_MARKER = "OTAGUARD-PROBE-OK"


class MachineError(AssertionError):
    """A wait on the machine failed (timeout or QEMU exited); the message has the log tail."""


_accel_memo: str | None = None


def _qemu_version() -> str:
    return subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True).stdout


def kvm_probe() -> tuple[bool, str]:
    """Boot the kernel with a tiny initramfs under KVM; (ok, details). Cached on disk."""
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False, "/dev/kvm not accessible"
    kernel = build.kernel_path()
    probe = build.probe_initrd()
    key = build.cache_key(
        "kvm-probe", _qemu_version(), build.file_hash(kernel), build.file_hash(probe)
    )
    cache = build.cache_dir() / f"kvm-probe-{key}.json"
    if cache.exists():
        data = json.loads(cache.read_text())
        return bool(data["ok"]), str(data["details"])
    log = build.cache_dir() / f".kvm-probe-{os.getpid()}.log"
    argv = [
        QEMU,
        "-accel",
        "kvm",
        "-cpu",
        "host",
        "-m",
        "256",
        "-nodefaults",
        "-display",
        "none",
        "-no-reboot",
        "-monitor",
        "none",
        "-serial",
        f"file:{log}",
        "-kernel",
        str(kernel),
        "-initrd",
        str(probe),
        "-append",
        "console=ttyS0 panic=-1 quiet",
    ]
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=PROBE_TIMEOUT)
        text = log.read_text(errors="replace") if log.exists() else ""
        ok = proc.returncode == 0 and PROBE_MARKER in text
        details = f"rc={proc.returncode} in {time.monotonic() - t0:.1f}s" + (
            "" if ok else f"; stderr={err.decode(errors='replace')[-500:]!r}; log={text[-500:]!r}"
        )
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        ok, details = False, f"no exit within {PROBE_TIMEOUT:.0f}s"
    finally:
        log.unlink(missing_ok=True)
    cache.write_text(json.dumps({"ok": ok, "details": details}))
    return ok, details


def select_accel() -> str:
    """The accelerator to use, "kvm" or "tcg" (see the module docstring)."""
    global _accel_memo
    forced = os.environ.get("OTAGUARD_VM_ACCEL", "").strip().lower()
    if forced:
        if forced not in {"tcg", "kvm"}:
            raise ValueError(f"OTAGUARD_VM_ACCEL must be tcg or kvm, not {forced!r}")
        return forced
    if _accel_memo is None:
        ok, _ = kvm_probe()
        _accel_memo = "kvm" if ok else "tcg"
    return _accel_memo


class Machine:
    """One QEMU run of ``disk``. Files (serial log, OVMF variable store) go to ``workdir``;
    pass the same ``vars_file`` to several machines to keep UEFI variables across boots."""

    _counter = 0

    def __init__(
        self,
        disk: Path,
        workdir: Path,
        *,
        host_port: int | None = None,
        memory: int = 768,
        accel: str | None = None,
        vars_file: Path | None = None,
        name: str | None = None,
        extra_args: tuple[str, ...] = (),
        bios: Path | None = None,
    ) -> None:
        Machine._counter += 1
        self.disk = disk
        self.workdir = workdir
        self.name = name or f"vm{Machine._counter}"
        self.host_port = host_port
        self.memory = memory
        self.accel = accel or select_accel()
        self.vars_file = vars_file or workdir / f"{self.name}-OVMF_VARS.fd"
        self.log_path = workdir / f"{self.name}-serial.log"
        self.extra_args = extra_args
        self.bios = bios  # firmware image instead of OVMF (U-Boot: tests/vm/ubootvm.py)
        self.proc: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self._text = ""
        self._raw = b""
        self._pos = 0

    # --- lifecycle -----------------------------------------------------------------------

    def argv(self) -> list[str]:
        netdev = "user,id=n0,restrict=on"
        if self.host_port is not None:
            netdev += (
                # cmd: spawns one relay process per guest connection; a "tcp:" chardev would
                # be ONE connection made at QEMU start, shared by every guest connection.
                f",guestfwd=tcp:{GUEST_FWD_ADDR}:{GUEST_FWD_PORT}"
                f"-cmd:/bin/busybox nc 127.0.0.1 {self.host_port}"
            )
        accel = ["-accel", "kvm", "-cpu", "host"] if self.accel == "kvm" else ["-accel", "tcg"]
        return [
            QEMU,
            "-name",
            self.name,
            *accel,
            "-m",
            str(self.memory),
            "-smp",
            "1",
            "-nodefaults",
            "-display",
            "none",
            "-monitor",
            "none",
            "-no-reboot",
            "-serial",
            f"file:{self.log_path}",
            *self.firmware_args(),
            "-drive",
            f"file={self.disk},format=raw,if=none,id=d0,cache=writeback",
            "-device",
            "virtio-blk-pci,drive=d0,bootindex=0",
            "-netdev",
            netdev,
            # romfile= : no iPXE option ROM, so the firmware does not try to boot from it
            "-device",
            "virtio-net-pci,netdev=n0,romfile=",
            "-device",
            "virtio-rng-pci",
            "-virtfs",
            "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap",
            *self.extra_args,
        ]

    def firmware_args(self) -> list[str]:
        if self.bios is not None:
            return ["-bios", str(self.bios)]
        return [
            "-drive",
            f"if=pflash,format=raw,readonly=on,file={build.OVMF_CODE}",
            "-drive",
            f"if=pflash,format=raw,file={self.vars_file}",
        ]

    def start(self) -> Machine:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.bios is None and not self.vars_file.exists():
            shutil.copyfile(build.OVMF_VARS, self.vars_file)
        self.log_path.write_bytes(b"")
        self._text, self._raw, self._pos = "", b"", 0
        self._stderr_path = self.workdir / f"{self.name}-qemu.stderr"
        with self._stderr_path.open("wb") as err:
            self.proc = subprocess.Popen(
                self.argv(), stdin=subprocess.DEVNULL, stdout=err, stderr=err
            )
        self.started_at = time.monotonic()
        return self

    def __enter__(self) -> Machine:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    def kill(self) -> None:
        """SIGKILL QEMU (a power cut); no-op when it already exited."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def returncode(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def elapsed(self) -> float:
        return time.monotonic() - self.started_at

    # --- the serial log ------------------------------------------------------------------

    def _read(self) -> None:
        try:
            with self.log_path.open("rb") as f:
                f.seek(len(self._raw))
                chunk = f.read()
        except FileNotFoundError:
            return
        if chunk:
            self._raw += chunk
            self._text = self._raw.decode("utf-8", "replace").replace("\r", "")

    def log_text(self) -> str:
        """The whole serial log so far (carriage returns removed)."""
        self._read()
        return self._text

    def _tail(self, n: int = 4000) -> str:
        text = self.log_text()
        err = ""
        if hasattr(self, "_stderr_path") and self._stderr_path.exists():
            err = self._stderr_path.read_text(errors="replace")[-1000:]
        return (
            f"[{self.name}, accel={self.accel}, {self.elapsed():.1f}s, rc={self.returncode}]\n"
            f"--- serial log tail ---\n{text[-n:]}\n--- qemu stderr ---\n{err}"
        )

    def wait_for(self, pattern: str | re.Pattern[str], timeout: float = 120.0) -> re.Match[str]:
        """Wait until ``pattern`` matches the log after the previous match (re.MULTILINE); the
        next wait_for continues after this match. Raises MachineError on timeout or when QEMU
        exits without the pattern appearing."""
        rx = re.compile(pattern, re.MULTILINE) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            exited = not self.running
            self._read()
            m = rx.search(self._text, self._pos)
            if m is not None:
                self._pos = m.end()
                return m
            if exited:
                raise MachineError(f"QEMU exited before {rx.pattern!r} appeared\n{self._tail()}")
            if time.monotonic() > deadline:
                raise MachineError(
                    f"timeout ({timeout}s) waiting for {rx.pattern!r}\n{self._tail()}"
                )
            time.sleep(0.05)

    def wait_exit(self, timeout: float = 120.0) -> int:
        """Wait for QEMU to exit by itself (guest reboot with -no-reboot); its exit code."""
        assert self.proc is not None, "not started"
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise MachineError(f"QEMU did not exit within {timeout}s\n{self._tail()}") from None
