"""The agent's configuration file (TOML; ``files/agent.example.toml`` documents every key).

Strict on purpose: an unknown key, a wrong type or a missing required value is E_CONFIG with
the key's name, before the agent touches a slot. The server's SPKI pin is required: a device
that would trust any certificate of the fleet CA is one CA mistake away from a rogue server.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import DeviceError, ErrorCode

MAX_CONFIG = 64 * 1024
BOOTLOADERS = ("grub", "uboot")
_PIN = re.compile(r"[0-9a-f]{64}")


def _fail(detail: str) -> DeviceError:
    return DeviceError(ErrorCode.CONFIG, detail)


@dataclass(frozen=True)
class AgentConfig:
    path: Path
    # [server]
    server_url: str
    spki_pins: tuple[str, ...]
    server_ca: Path
    poll_interval: int = 3600
    poll_jitter: float = 0.1
    timeout: float = 30.0
    renew_fraction: float = 1 / 3  # device/renewal.py; 0 turns renewal off
    # [device]
    state_dir: Path = Path("/var/lib/otaguard")
    run_dir: Path = Path("/run/otaguard")
    slot_a: str = "PARTLABEL=rootfs-a"
    slot_b: str = "PARTLABEL=rootfs-b"
    max_tries: int = 3
    checkpoint: int = 1024 * 1024
    store: str = "file"  # "tpm": counters, root hash and identity key in a TPM 2.0 (tpm.py)
    tpm_tcti: str = "device:/dev/tpmrm0"
    # [bootloader]
    bootloader: str = "grub"  # "grub" (files/grub.cfg) or "uboot" (files/boot.cmd)
    fw_env_config: Path = Path("/etc/otaguard/fw_env.config")  # libubootenv's, for "uboot"
    grubenv: tuple[Path, Path] = (
        Path("/boot/efi/otaguard/grubenv.0"),
        Path("/boot/efi/otaguard/grubenv.1"),
    )
    cmdline: Path = Path("/proc/cmdline")
    # [self_test]
    self_test: tuple[tuple[str, ...], ...] = ()
    self_test_timeout: float = 60.0
    # [system]
    reboot: tuple[str, ...] = ("systemctl", "reboot")

    @classmethod
    def load(cls, path: Path) -> AgentConfig:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raise _fail(f"config file {path} does not exist") from None
        except OSError as exc:
            raise _fail(f"cannot read config file {path}: {exc.strerror}") from None
        if len(raw) > MAX_CONFIG:
            raise _fail(f"config file {path} is larger than {MAX_CONFIG} bytes")
        try:
            doc = tomllib.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise _fail(f"{path}: not valid TOML: {exc}") from None
        return cls.from_dict(doc, path)

    @classmethod
    def from_dict(cls, doc: dict[str, Any], path: Path) -> AgentConfig:
        known = {"server", "device", "bootloader", "self_test", "system"}
        for section in doc:
            if section not in known:
                raise _fail(f"unknown section [{section}]")
        r = _Reader(doc)
        url = r.text("server", "url")
        if not url.startswith("https://"):
            raise _fail("server.url must be an https:// URL")
        pins = tuple(p.lower() for p in r.texts("server", "spki_pins"))
        if not pins:
            raise _fail("server.spki_pins is required (SHA-256 of the server's public key)")
        for p in pins:
            if not _PIN.fullmatch(p):
                raise _fail(f"server.spki_pins: {p!r} is not a hex SHA-256")
        state_dir = Path(r.text("device", "state_dir", str(cls.state_dir)))
        grubenv = r.texts("bootloader", "grubenv", [str(p) for p in cls.grubenv])
        bootloader = r.text("bootloader", "type", cls.bootloader)
        if bootloader not in BOOTLOADERS:
            raise _fail(f"bootloader.type must be one of {', '.join(BOOTLOADERS)}")
        if len(grubenv) != 2:
            raise _fail("bootloader.grubenv must name exactly two env copies")
        commands = r.items("self_test", "commands", [])
        tests: list[tuple[str, ...]] = []
        for c in commands:
            if not isinstance(c, list) or not c or not all(isinstance(a, str) for a in c):
                raise _fail("self_test.commands must be a list of non-empty argv lists")
            tests.append(tuple(c))
        reboot = tuple(r.texts("system", "reboot", list(cls.reboot)))
        if not reboot:
            raise _fail("system.reboot must be a non-empty argv list")
        cfg = cls(
            path=path,
            server_url=url,
            spki_pins=pins,
            server_ca=Path(r.text("server", "ca", str(state_dir / "server-ca.pem"))),
            poll_interval=r.integer("server", "poll_interval", cls.poll_interval, 1, 7 * 86400),
            poll_jitter=r.number("server", "poll_jitter", cls.poll_jitter, 0.0, 1.0),
            timeout=r.number("server", "timeout", cls.timeout, 1.0, 3600.0),
            renew_fraction=r.number("server", "renew_fraction", cls.renew_fraction, 0.0, 0.9),
            state_dir=state_dir,
            run_dir=Path(r.text("device", "run_dir", str(cls.run_dir))),
            slot_a=r.text("device", "slot_a", cls.slot_a),
            slot_b=r.text("device", "slot_b", cls.slot_b),
            max_tries=r.integer("device", "max_tries", cls.max_tries, 1, 9),
            checkpoint=r.integer("device", "checkpoint", cls.checkpoint, 4096, 1 << 30),
            store=r.text("device", "store", cls.store),
            tpm_tcti=r.text("device", "tpm_tcti", cls.tpm_tcti),
            bootloader=bootloader,
            fw_env_config=Path(r.text("bootloader", "fw_env_config", str(cls.fw_env_config))),
            grubenv=(Path(grubenv[0]), Path(grubenv[1])),
            cmdline=Path(r.text("bootloader", "cmdline", str(cls.cmdline))),
            self_test=tuple(tests),
            self_test_timeout=r.number("self_test", "timeout", cls.self_test_timeout, 1.0, 3600.0),
            reboot=reboot,
        )
        r.finish()
        if cfg.store not in ("file", "tpm"):
            raise _fail("device.store must be 'file' or 'tpm'")
        if cfg.checkpoint % 4096:
            raise _fail("device.checkpoint must be a multiple of 4096")
        return cfg


class _Reader:
    """Typed access that remembers which keys were read, so leftovers are reported."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.used: set[tuple[str, str]] = set()

    def _get(self, section: str, key: str, default: Any) -> Any:
        sec = self.doc.get(section, {})
        if not isinstance(sec, dict):
            raise _fail(f"[{section}] must be a table")
        self.used.add((section, key))
        if key not in sec:
            if default is _REQUIRED:
                raise _fail(f"{section}.{key} is required")
            return default
        return sec[key]

    def text(self, section: str, key: str, default: Any = None) -> str:
        v = self._get(section, key, _REQUIRED if default is None else default)
        if not isinstance(v, str) or not v:
            raise _fail(f"{section}.{key} must be a non-empty string")
        return v

    def items(self, section: str, key: str, default: Any = None) -> list[Any]:
        v = self._get(section, key, _REQUIRED if default is None else default)
        if not isinstance(v, list):
            raise _fail(f"{section}.{key} must be a list")
        return v

    def texts(self, section: str, key: str, default: Any = None) -> list[str]:
        v = self.items(section, key, default)
        if not all(isinstance(x, str) and x for x in v):
            raise _fail(f"{section}.{key} must be a list of strings")
        return v

    def integer(self, section: str, key: str, default: int, lo: int, hi: int) -> int:
        v = self._get(section, key, default)
        if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
            raise _fail(f"{section}.{key} must be an integer in [{lo}, {hi}]")
        return v

    def number(self, section: str, key: str, default: float, lo: float, hi: float) -> float:
        v = self._get(section, key, default)
        if isinstance(v, bool) or not isinstance(v, int | float) or not lo <= v <= hi:
            raise _fail(f"{section}.{key} must be a number in [{lo}, {hi}]")
        return float(v)

    def finish(self) -> None:
        for section, sec in self.doc.items():
            for key in sec:
                if (section, key) not in self.used:
                    raise _fail(f"unknown key {section}.{key}")


_REQUIRED: Any = object()
