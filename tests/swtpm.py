"""A software TPM 2.0 (Debian's swtpm) for the TPM tests: over TCP on 127.0.0.1 for the host
tests and the factory step, or as QEMU's TPM emulator backend on a unix socket for a VM. One
process over a persistent state directory, stopped by its PID."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path

from tests.support import require_binary, stop_process


def free_port_pair() -> int:
    while True:
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = int(a.getsockname()[1])
        if port < 65000:
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port


class SoftTpm:
    """One swtpm process over a persistent state directory (the TPM's NV survives restarts,
    as a chip's does across power cycles); stopped by its PID."""

    def __init__(self, state: Path) -> None:
        self.state = state
        state.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None
        self.tcti = ""

    def _start(self, argv: list[str]) -> None:
        assert self.proc is None
        self.proc = subprocess.Popen(
            [require_binary("swtpm"), "socket", "--tpm2", "--tpmstate", f"dir={self.state}", *argv],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def serve_tcp(self) -> str:
        """For the factory and for reading the counters on the host."""
        for _ in range(5):  # a port taken between the probe and swtpm's bind: another pair
            port = free_port_pair()
            self._start(
                [
                    "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
                    "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                    "--flags", "not-need-init,startup-clear",
                ]
            )  # fmt: skip
            assert self.proc is not None
            for _ in range(250):
                if self.proc.poll() is not None:
                    break
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except OSError:
                    time.sleep(0.02)
                    continue
                self.tcti = f"swtpm:host=127.0.0.1,port={port}"
                return self.tcti
            self.stop()
        raise RuntimeError("swtpm did not start")

    def serve_qemu(self, sock: Path) -> tuple[str, ...]:
        """For a VM: QEMU's TPM emulator backend on a unix socket; the firmware and kernel
        drive the TPM from its power-on."""
        sock.unlink(missing_ok=True)
        self._start(["--ctrl", f"type=unixio,path={sock}", "--flags", "startup-clear"])
        for _ in range(200):
            if sock.exists():
                break
            time.sleep(0.02)
        return (
            "-chardev", f"socket,id=chrtpm,path={sock}",
            "-tpmdev", "emulator,id=tpm0,chardev=chrtpm",
            "-device", "tpm-tis,tpmdev=tpm0",
        )  # fmt: skip

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
