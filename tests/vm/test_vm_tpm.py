"""`otaguard agent` with a TPM 2.0 in the VM: a software TPM (Debian's swtpm) attached to QEMU as
a TIS device, reached by the guest's kernel driver as /dev/tpmrm0.

The factory step runs the real CLI (`agent provision` with ``device.store = "tpm"``) against the
very TPM state the VM then boots with (swtpm over TCP on the host, then the same state directory
behind QEMU): the storage root key and identity key are created inside it, the root anchor is
written and locked, the counters are defined; the CSR it emits is enrolled with the real
server and `agent install-cert` stores the certificate. In the guest the agent then checks in
over mTLS with the TPM-held key, installs an update whose confirmation raises the TPM counter,
and, after the whole data partition is put back from an image taken before the update (the
VM off, the partition's bytes written back), refuses to run the older release: its boot check
fails with E_SECURITY_COUNTER because the TPM counter did not go back.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import otaguard
from otaguard.device.linux.grubenv import decode_block
from otaguard.device.linux.tpm import Tpm, TpmStore
from otaguard.server.pki.enroll import enroll_device

from ..swtpm import SoftTpm
from . import build
from .backend import (
    HW_REV,
    MODEL,
    SERIAL,
    Backend,
    Release,
    agent_config,
    backend,
    otaguard_bin,
    spki_pin,
)
from .machine import Machine
from .test_vm_update import BOOT, MAX_TRIES, Rig

pytestmark = pytest.mark.vm


class VmTpm(SoftTpm):
    def counters(self) -> tuple[int, int]:
        """(security counter, key-list version) as the TPM counts them (the VM is off)."""
        tpm = Tpm(self.serve_tcp())
        try:
            return TpmStore(tpm).floor()
        finally:
            tpm.close()
            self.stop()


class TpmRig(Rig):
    tpm: VmTpm

    def start(self) -> Machine:
        assert self.vm is None or not self.vm.running
        self.tpm.stop()  # a power cycle of the whole board, TPM included
        self.work.mkdir(parents=True, exist_ok=True)
        args = self.tpm.serve_qemu(self.work / "tpm.sock")
        self.vm = Machine(
            self.disk, self.work, host_port=self.be.relay.port, vars_file=self.work / "vars.fd",
            name=f"boot{len(self.boots) + 1}", extra_args=args,
        ).start()  # fmt: skip
        return self.vm

    def off(self) -> None:
        if self.vm is not None:
            self.vm.kill()
        self.tpm.stop()

    def data_partition(self) -> bytes:
        with self.disk.open("rb") as f:
            f.seek(build.partition_offset(self.disk, 4))
            return f.read(build.partition_size(self.disk, 4))

    def restore_data_partition(self, image: bytes) -> None:
        """What an attacker with the disk does: the data partition's bytes put back."""
        with self.disk.open("r+b") as f:
            f.seek(build.partition_offset(self.disk, 4))
            f.write(image)


def _run(argv: list[str]) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert proc.returncode == 0, (argv[:3], proc.stdout, proc.stderr)
    return proc.stdout


def provision_tpm_disk(be: Backend, out: Path, factory: Release, tpm: VmTpm) -> Path:
    """The factory with a TPM: `agent provision` (TPM store) -> CSR -> enrollment ->
    `agent install-cert`, into a data-partition tree; then the disk."""
    work = out.parent / f"{out.name}.factory"
    shutil.rmtree(work, ignore_errors=True)
    data = work / "data"
    (data / "otaguard").mkdir(parents=True)
    pin = spki_pin((be.tls / "server.pem").read_bytes())
    tpm_lines = 'store = "tpm"\ntpm_tcti = "device:/dev/tpmrm0"\n'
    guest_cfg = agent_config(pin, max_tries=MAX_TRIES).replace(
        "checkpoint = 1048576\n", "checkpoint = 1048576\n" + tpm_lines
    )
    (data / "agent.toml").write_text(guest_cfg)
    # The guest runs the code under test (this checkout's package, seen over 9p), not
    # whatever the venv's `otaguard` script would import.
    src = Path(otaguard.__file__).resolve().parents[1]
    (data / "otaguard-agent").write_text(
        f"#!/bin/sh\nPYTHONPATH={src} exec {sys.executable} -c "
        "'import sys; from otaguard.cli.main import main; "
        'sys.argv[0] = "otaguard"; sys.exit(main())\' '
        '"$@"\n'
    )
    (data / "otaguard-agent").chmod(0o755)
    (data / "boot.env").write_text(
        "OTAGUARD_BIN=/mnt/otaguard-agent\nOTAGUARD_CONFIG=/mnt/agent.toml\n"
    )
    tcti = tpm.serve_tcp()
    factory_cfg = work / "factory.toml"
    factory_cfg.write_text(
        guest_cfg.replace("device:/dev/tpmrm0", tcti).replace(
            'state_dir = "/mnt/otaguard"', f'state_dir = "{data / "otaguard"}"'
        )
    )
    slot_a = work / "slot-a.img"
    shutil.copyfile(factory.image, slot_a)
    slot_b = work / "slot-b.img"
    with slot_b.open("wb") as f:
        f.truncate(build.slot_partition_size())
    (work / "factory.suit").write_bytes(factory.manifest)
    (work / "trust.bundle").write_bytes(be.lab.bundle.to_bytes())
    (work / "owner.auth").write_bytes(b"factory-owner-secret")
    env0, env1 = work / "grubenv.0", work / "grubenv.1"
    csr = work / "device.csr"
    try:
        _run([
            str(otaguard_bin()), "agent", "provision", "--config", str(factory_cfg),
            "--trust", str(work / "trust.bundle"), "--vendor", "hvac.example.com",
            "--model", MODEL, "--hw-rev", HW_REV,
            "--factory-image", str(factory.image), "--factory-manifest", str(work / "factory.suit"),
            "--server-ca", str(be.tls / "ca.pem"), "--state-dir", str(data / "otaguard"),
            "--slot-a", str(slot_a), "--slot-b", str(slot_b), "--grubenv", str(env0), str(env1),
            "--tpm-new-owner-auth", str(work / "owner.auth"),
            "--serial", SERIAL, "--csr-out", str(csr),
        ])  # fmt: skip
        enrolled = enroll_device(
            be.ca, be.db, serial=SERIAL, model=MODEL, hw_rev=HW_REV, groups=["vm"],
            out_dir=work / "enrolled", csr_pem=csr.read_bytes(), replace=True,
        )  # fmt: skip
        assert enrolled.key_path is None  # the server never saw a private key
        _run([
            str(otaguard_bin()), "agent", "install-cert", "--config", str(factory_cfg),
            "--cert", str(enrolled.cert_path),
        ])  # fmt: skip
    finally:
        tpm.stop()
    assert not (data / "otaguard" / "otp").exists()  # the root hash went into the TPM
    env = decode_block(env0.read_bytes())
    env.pop("OG_VALID", None)
    disk = build.disk(out, slot_a=slot_a, slot_b=None, data_dir=data, env=env)
    for i, p in enumerate((env0, env1)):
        build.esp_write(disk, f"/otaguard/grubenv.{i}", p.read_bytes())
    return disk


@pytest.fixture(scope="module")
def images() -> dict[str, Path]:
    build.require_vm_tools()
    return {
        "1.0.0": build.slot_image("1.0.0"),
        "2.0.0": build.slot_image("2.0.0", extra=b"2.0.0 payload\n" * 512),
    }


@pytest.fixture
def rig(tmp_path: Path, images: dict[str, Path]) -> Iterator[TpmRig]:
    tpm = VmTpm(tmp_path / "tpm-state")
    with backend(tmp_path / "server") as be:
        factory = be.publish("1.0.0", images["1.0.0"], counter=1)
        disk = provision_tpm_disk(be, tmp_path / "disk.img", factory, tpm)
        r = TpmRig(be, disk, tmp_path / "vm")
        r.tpm = tpm
        try:
            yield r
        finally:
            r.off()


def test_tpm_counter_survives_a_restored_data_partition(
    rig: TpmRig, images: dict[str, Path]
) -> None:
    be = rig.be
    security, keylist = rig.tpm.counters()
    assert (security, keylist) == (1, 1)  # the factory image's counter, the key list's version
    before_update = rig.data_partition()  # the attacker's copy, taken before the update
    rel = be.publish("2.0.0", images["2.0.0"], counter=2)
    be.assign(rel)
    # boot 1: the factory image checks in over mTLS with the TPM-held key, gets the update
    vm = rig.start()
    b = rig.booted(vm)
    assert (b.slot, b.version) == ("A", "1.0.0")
    vm.wait_for(r"boot-check slot=A mode=normal version=1\.0\.0", BOOT)
    vm.wait_for(r"rebooting: rebooting to start the installed image", BOOT)
    rig.finish(vm)
    # boot 2: the new image confirms itself; the confirmation raises the TPM counter
    vm = rig.start()
    b = rig.booted(vm)
    assert (b.slot, b.version) == ("B", "2.0.0")
    vm.wait_for(r"mark-good: slot B version 2\.0\.0 confirmed", BOOT)
    vm.wait_for(r"poll outcome=idle version=2\.0\.0", BOOT)
    rig.off()
    assert rig.tpm.counters() == (2, keylist)  # raised in the TPM at the confirmation
    assert be.device()["current_version"] == "2.0.0"
    # the attack: the whole data partition put back as it was before the update
    rig.restore_data_partition(before_update)
    vm = rig.start()
    rig.booted(vm)  # GRUB (its env is on the ESP) starts B; the restored state points at A
    m = vm.wait_for(r"otaguard: error (E_\w+): (.*)$", BOOT)
    assert m[1] == "E_NO_VALID_SLOT" and "E_SECURITY_COUNTER" in m[2], m[0]
    vm.wait_for(r"boot-check rc=1", BOOT)
    rig.off()
    assert rig.tpm.counters() == (2, keylist)  # the TPM did not go back
