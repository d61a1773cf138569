"""The TPM 2.0 store of the Linux agent against a real software TPM (swtpm), on the host.

Each test gets its own swtpm (TCP on 127.0.0.1, state in the test's tmp dir, stopped by PID):
provisioning, the counters as a floor under a restored counter record (the whole state
directory put back from a copy taken before an update), the TPM-held key in a real TLS
handshake, the key's non-exportability, and every bad-TPM case with its code.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from otaguard.clock import SimClock
from otaguard.device.https_transport import HttpsTransport
from otaguard.device.lab import Lab, MemoryTransport
from otaguard.device.linux.config import AgentConfig
from otaguard.device.linux.system import LinuxDevice
from otaguard.device.linux.tpm import (
    ANCHOR_INDEX,
    COUNTER_ATTRS,
    KEYLIST_INDEX,
    SECURITY_INDEX,
    Tpm,
    create_identity_key,
    ensure_srk,
    is_tpm_key,
)
from otaguard.device.linux.tpmtls import (
    TlsKeyHook,
    TpmKey,
    blob_spki,
    tpm_csr,
    tpm_key_loader,
    tpm_key_maker,
)
from otaguard.device.renewal import CertRenewal
from otaguard.device.storage import Identity
from otaguard.errors import ErrorCode, OtaError
from otaguard.sim.renewal import MemoryIdentityStore
from tests.pg import Harness, fleet_ca, server_tls  # noqa: F401
from tests.swtpm import SoftTpm, free_port_pair
from tests.test_cert_renewal import DAY, hr  # noqa: F401
from tests.test_linux_agent import Rig, image, write_config


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[SoftTpm]:
    t = SoftTpm(tmp_path / "swtpm")
    t.serve_tcp()
    yield t
    t.stop()


class TpmRig(Rig):
    """The Linux test rig with ``device.store = "tpm"``: one connection at a time (swtpm's
    TCP server serves one client), so every device is closed before the next opens."""

    def __init__(self, d: Path, lab: Lab, tcti: str) -> None:
        d.mkdir(parents=True, exist_ok=True)
        super().__init__(d, lab)
        extra = f'\nstore = "tpm"\ntpm_tcti = "{tcti}"'
        text = (
            (d / "agent.toml")
            .read_text()
            .replace("checkpoint = 65536", "checkpoint = 65536" + extra)
        )
        (d / "agent.toml").write_text(text)
        self.cfg = AgentConfig.load(d / "agent.toml")
        self.current: LinuxDevice | None = None

    def _close(self) -> None:
        if self.current is not None and self.current.tpm is not None:
            self.current.tpm.close()
        self.current = None

    def provision_tpm(self, factory: bytes, owner_auth: bytes = b"") -> None:
        from otaguard.device.device import Provisioning
        from otaguard.device.lab import chunks

        self._close()
        manifest = self.lab.release(factory, version="1.0.0", seq=1, counter=1)
        prov = Provisioning(
            self.lab.bundle, self.lab.vendor_id, self.lab.class_id, self.lab.model,
            self.lab.hw_rev, manifest,
        )  # fmt: skip
        dev = LinuxDevice(self.cfg, running=0, provisioning=True, tpm_owner_auth=owner_auth)
        self.current = dev
        dev.provision(prov, chunks(factory))
        self._close()

    def device(self, running: int) -> LinuxDevice:
        self._close()
        dev = super().device(running)
        self.current = dev
        return dev


@pytest.fixture
def trig(tmp_path: Path, swtpm: SoftTpm) -> Iterator[TpmRig]:
    r = TpmRig(tmp_path / "dev", Lab(now=int(time.time())), swtpm.tcti)
    r.provision_tpm(image("1.0.0"))
    yield r
    r._close()


def _update(rig: TpmRig, version: str, seq: int, counter: int) -> None:
    dev = rig.boot(0)
    dev.assess()
    new = image(version)
    dev.install(
        MemoryTransport(rig.lab.release(new, version=version, seq=seq, counter=counter), new)
    )
    dev = rig.boot(1)
    assert dev.assess().mode == "test"
    assert dev.run_self_test(lambda _b: True) == "confirmed"


def test_status_says_which_store(trig: TpmRig, tmp_path: Path) -> None:
    st = trig.boot(0).status()
    assert st["storage"] == "tpm" and st["tpm"]["tcti"].startswith("swtpm:")
    assert not (trig.cfg.state_dir / "otp").exists()  # the root hash is in the TPM, not a file
    (tmp_path / "plain").mkdir()
    plain = Rig(tmp_path / "plain", trig.lab)
    plain.provision(image("1.0.0"))
    st = plain.boot(0).status()
    assert st["storage"] == "file" and st["storage_note"].startswith("no TPM:")


def test_restored_state_directory_cannot_lower_the_tpm_counter(trig: TpmRig) -> None:
    """The attack: the data partition put back from a copy taken before the update."""
    trig.boot(0).assess()
    before = trig.d / "state-before"
    shutil.copytree(trig.cfg.state_dir, before)
    _update(trig, "1.1.0", seq=2, counter=3)
    dev = trig.boot(1)
    assert dev.assess().mode == "normal"
    assert dev.status()["counters"]["security"] == 3
    trig._close()
    shutil.rmtree(trig.cfg.state_dir)
    shutil.copytree(before, trig.cfg.state_dir)  # the old records, MACs and all
    dev = trig.boot(0)
    assert dev.status()["counters"]["security"] == 3  # the TPM is the floor
    old = image("1.0.9")
    rel = trig.lab.release(old, version="1.0.9", seq=3, counter=2)
    with pytest.raises(OtaError) as ei:
        dev.install(MemoryTransport(rel, old))
    assert ei.value.code == ErrorCode.SECURITY_COUNTER


def test_counter_raised_before_record_survives_a_cut(trig: TpmRig) -> None:
    """Power cut between the TPM increment and the record write: the TPM is ahead, reads agree."""
    dev = trig.boot(0)
    dev.assess()
    assert dev.tpm_store is not None
    dev.tpm_store.raise_to(4, 2)  # the first half of SecureStorage._write_counters
    c = dev.storage.counters()
    assert (c.security, c.keylist_version) == (4, 2)
    with pytest.raises(OtaError) as ei:
        dev.storage.advance(security=3)
    assert ei.value.code == ErrorCode.COUNTER_DECREASE


def test_tpm_key_in_a_real_tls_handshake_and_csr(swtpm: SoftTpm, tmp_path: Path) -> None:
    tpm = Tpm(swtpm.tcti)
    try:
        ensure_srk(tpm, b"")
        blob = create_identity_key(tpm)
        key = TpmKey(tpm, blob)
        csr = x509.load_pem_x509_csr(tpm_csr(key, "dev-0001"))
        assert csr.is_signature_valid
        assert csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "dev-0001"
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_pem, _ = _cert("ca", ca_key.public_key(), ca_key, ca=True)
        dev_pem, _ = _cert("dev-0001", csr.public_key(), ca_key)
        srv_key = ec.generate_private_key(ec.SECP256R1())
        srv_pem, _ = _cert("localhost", srv_key.public_key(), ca_key, san="localhost")
        for name, data in (("ca.pem", ca_pem), ("dev.pem", dev_pem), ("srv.pem", srv_pem)):
            (tmp_path / name).write_bytes(data)
        (tmp_path / "srv.key").write_bytes(
            srv_key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        server.load_cert_chain(tmp_path / "srv.pem", tmp_path / "srv.key")
        server.load_verify_locations(tmp_path / "ca.pem")
        server.verify_mode = ssl.CERT_REQUIRED
        hook = TlsKeyHook(key)
        for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
            client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            client.load_verify_locations(tmp_path / "ca.pem")
            client.maximum_version = version
            hook.install(client, tmp_path / "dev.pem")
            seen = _handshake(server, client)
            assert seen == "dev-0001"
        assert hook.failures == 0
        # a certificate for another key is refused before any handshake
        other = ec.generate_private_key(ec.SECP256R1())
        (tmp_path / "other.pem").write_bytes(_cert("dev-0001", other.public_key(), ca_key)[0])
        with pytest.raises(OtaError) as ei:
            hook.install(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), tmp_path / "other.pem")
        assert ei.value.code == ErrorCode.CERT
    finally:
        tpm.close()


def test_identity_key_cannot_be_exported(swtpm: SoftTpm, tmp_path: Path) -> None:
    from tpm2_pytss import TSS2_Exception
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_CC, TPM2_RC, TPM2_SE, TPMA_OBJECT
    from tpm2_pytss.types import TPM2B_DATA, TPMT_SYM_DEF, TPMT_SYM_DEF_OBJECT

    tpm = Tpm(swtpm.tcti)
    try:
        ensure_srk(tpm, b"")
        blob = create_identity_key(tpm)
        key = TpmKey(tpm, blob)
        # Duplicate (the TPM's only way out for a key) is refused for a fixedParent key, even
        # with the policy session it demands
        session = tpm.ectx.start_auth_session(
            ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY,
            TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256,
        )  # fmt: skip
        tpm.ectx.policy_command_code(session, TPM2_CC.Duplicate)
        with pytest.raises(TSS2_Exception) as ei:
            tpm.ectx.duplicate(
                key.handle, ESYS_TR.NULL, TPM2B_DATA(),
                TPMT_SYM_DEF_OBJECT(algorithm=TPM2_ALG.NULL), session1=session,
            )  # fmt: skip
        # (empty authPolicy: no policy can ever satisfy it; fixedParent: refused even then)
        assert int(ei.value.error) in (TPM2_RC.POLICY_FAIL, TPM2_RC.ATTRIBUTES), str(ei.value)
        attrs = int(tpm.ectx.read_public(key.handle)[0].publicArea.objectAttributes)
        assert attrs & TPMA_OBJECT.FIXEDTPM and attrs & TPMA_OBJECT.FIXEDPARENT
        # ReadPublic gives only the public area; the blob's private part is wrapped by the SRK
        pub, _, _ = tpm.ectx.read_public(key.handle)
        assert pub.publicArea.type == TPM2_ALG.ECC
    finally:
        tpm.close()
    (tmp_path / "key.tss2").write_bytes(blob)
    # OpenSSL without the TPM provider cannot read a private key out of the blob
    res = subprocess.run(
        ["openssl", "pkey", "-in", str(tmp_path / "key.tss2"), "-outform", "DER"],
        capture_output=True,
        env={"PATH": "/usr/bin:/bin", "OPENSSL_CONF": "/dev/null"},
        check=False,
    )
    assert res.returncode != 0 and res.stdout == b""


# --- bad TPMs --------------------------------------------------------------------------------
def test_no_tpm_is_refused(tmp_path: Path) -> None:
    with pytest.raises(OtaError) as ei:
        Tpm(f"device:{tmp_path / 'tpmrm0'}")
    assert ei.value.code == ErrorCode.TPM
    port = free_port_pair()  # nothing listens there
    with pytest.raises(OtaError) as ei:
        Tpm(f"swtpm:host=127.0.0.1,port={port}")
    assert ei.value.code == ErrorCode.TPM


def test_device_without_its_tpm_refuses_to_install(trig: TpmRig, tmp_path: Path) -> None:
    trig._close()
    gone = trig.cfg.__class__.load(
        write_config(trig.d, device=_device_section(trig.d, "device:/nonexistent/tpmrm0"))
    )
    with pytest.raises(OtaError) as ei:
        LinuxDevice(gone, running=0)
    assert ei.value.code == ErrorCode.TPM


def test_lockout_is_refused(trig: TpmRig) -> None:
    from tpm2_pytss import TSS2_Exception
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG
    from tpm2_pytss.types import TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC

    trig._close()
    tpm = Tpm(trig.cfg.tpm_tcti)
    e = tpm.ectx
    e.dictionary_attack_parameters(1, 600, 600)
    pub = TPM2B_NV_PUBLIC(
        nvPublic=TPMS_NV_PUBLIC(
            nvIndex=0x01500200, nameAlg=TPM2_ALG.SHA256, dataSize=8,
            attributes=int(COUNTER_ATTRS) & ~0x02000000,  # the same, but DA-protected
        )
    )  # fmt: skip
    tr = e.nv_define_space(b"secret", pub, ESYS_TR.OWNER)
    e.tr_set_auth(tr, b"wrong")
    with pytest.raises(TSS2_Exception):
        e.nv_increment(tr, tr)  # one failed authorization: maxTries=1 -> lockout
    tpm.close()
    with pytest.raises(OtaError) as ei:
        trig.boot(0)
    assert ei.value.code == ErrorCode.TPM_LOCKOUT


def test_unknown_owner_password_is_refused_at_provisioning(swtpm: SoftTpm, tmp_path: Path) -> None:
    tpm = Tpm(swtpm.tcti)
    tpm.take_ownership(b"factory-secret")
    tpm.close()
    rig = TpmRig(tmp_path / "dev", Lab(now=int(time.time())), swtpm.tcti)
    with pytest.raises(OtaError) as ei:
        rig.provision_tpm(image("1.0.0"), owner_auth=b"guess")
    assert ei.value.code == ErrorCode.TPM_AUTH
    rig._close()
    rig.provision_tpm(image("1.0.0"), owner_auth=b"factory-secret")
    assert rig.boot(0).assess().mode == "normal"


@pytest.mark.parametrize("which", ["counter-not-a-counter", "anchor-not-locked"])
def test_unexpected_nv_attributes_are_refused(swtpm: SoftTpm, tmp_path: Path, which: str) -> None:
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPMA_NV
    from tpm2_pytss.types import TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC

    rig = TpmRig(tmp_path / "dev", Lab(now=int(time.time())), swtpm.tcti)
    if which == "counter-not-a-counter":
        # someone defined an ordinary index where the security counter belongs
        handle = SECURITY_INDEX
        attrs = TPMA_NV.AUTHWRITE | TPMA_NV.AUTHREAD | TPMA_NV.NO_DA
    else:
        # an anchor that looks right but was never write-locked
        handle = ANCHOR_INDEX
        attrs = TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHREAD | TPMA_NV.NO_DA
    tpm = Tpm(swtpm.tcti)
    pub = TPM2B_NV_PUBLIC(
        nvPublic=TPMS_NV_PUBLIC(
            nvIndex=handle, nameAlg=TPM2_ALG.SHA256, attributes=attrs, dataSize=64
        )
    )
    tr = tpm.ectx.nv_define_space(b"", pub, ESYS_TR.OWNER)
    writer = tr if which == "counter-not-a-counter" else ESYS_TR.OWNER
    tpm.ectx.nv_write(tr, b"OGTA" + bytes(60), 0, writer)
    tpm.close()
    with pytest.raises(OtaError) as ei:
        rig.provision_tpm(image("1.0.0"))
    # provisioning stops: the counter is not one; an anchor is there already (never rewritten)
    want = ErrorCode.TPM_NV if which == "counter-not-a-counter" else ErrorCode.OTP_WRITTEN
    assert ei.value.code == want
    rig._close()
    # whatever provisioning did, the agent will not run on this TPM
    with pytest.raises(OtaError) as ei:
        rig.boot(0)
    assert ei.value.code == ErrorCode.TPM_NV


def test_counter_replaced_after_provisioning_stops_the_agent(trig: TpmRig) -> None:
    """Deleting the counter and defining an ordinary index in its place (an owner could)."""
    from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPMA_NV
    from tpm2_pytss.types import TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC

    trig._close()
    tpm = Tpm(trig.cfg.tpm_tcti)
    tpm.ectx.nv_undefine_space(tpm.ectx.tr_from_tpmpublic(KEYLIST_INDEX), ESYS_TR.OWNER)
    pub = TPM2B_NV_PUBLIC(
        nvPublic=TPMS_NV_PUBLIC(
            nvIndex=KEYLIST_INDEX, nameAlg=TPM2_ALG.SHA256, dataSize=8,
            attributes=TPMA_NV.AUTHWRITE | TPMA_NV.AUTHREAD | TPMA_NV.NO_DA,
        )
    )  # fmt: skip
    tr = tpm.ectx.nv_define_space(b"", pub, ESYS_TR.OWNER)
    tpm.ectx.nv_write(tr, bytes(8), 0, tr)
    tpm.close()
    with pytest.raises(OtaError) as ei:
        trig.boot(0)
    assert ei.value.code == ErrorCode.TPM_NV
    assert "attributes" in ei.value.detail


# --- helpers ---------------------------------------------------------------------------------
def _device_section(d: Path, tcti: str) -> str:
    return (
        f'state_dir = "{d / "state"}"\nrun_dir = "{d / "run"}"\n'
        f'slot_a = "{d / "slot-a.img"}"\nslot_b = "{d / "slot-b.img"}"\n'
        f'max_tries = 3\ncheckpoint = 65536\nstore = "tpm"\ntpm_tcti = "{tcti}"'
    )


def _cert(
    cn: str,
    pub: object,
    signer: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    san: str | None = None,
) -> tuple[bytes, x509.Certificate]:
    now = dt.datetime.now(dt.UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ca")]))
        .public_key(pub)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if san:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
    cert = b.sign(signer, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), cert


def _handshake(server: ssl.SSLContext, client: ssl.SSLContext) -> str:
    """One real TLS handshake on 127.0.0.1; the CN of the client certificate the server saw."""
    ls = socket.socket()
    ls.bind(("127.0.0.1", 0))
    ls.listen(1)
    out: dict[str, object] = {}

    def serve() -> None:
        conn, _ = ls.accept()
        try:
            with server.wrap_socket(conn, server_side=True) as s:
                cert = s.getpeercert()
                out["cn"] = dict(x[0] for x in cert["subject"])["commonName"] if cert else None
                s.sendall(b"ok")
        except (OSError, ssl.SSLError) as exc:
            out["error"] = repr(exc)

    th = threading.Thread(target=serve)
    th.start()
    try:
        with client.wrap_socket(
            socket.create_connection(ls.getsockname(), timeout=10), server_hostname="localhost"
        ) as c:
            assert c.recv(2) == b"ok"
    finally:
        th.join(10)
        ls.close()
    assert "error" not in out, out
    return str(out["cn"])


def test_status_json_has_no_secret(trig: TpmRig) -> None:
    text = json.dumps(trig.boot(0).status(), default=str)
    assert "huk" not in text.lower()


# --- the CLI ---------------------------------------------------------------------------------
def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    from otaguard.cli.main import main

    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_provision_install_cert_and_status(
    swtpm: SoftTpm, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rig = TpmRig(tmp_path / "dev", Lab(now=int(time.time())), swtpm.tcti)
    tpm = Tpm(swtpm.tcti)
    tpm.take_ownership(b"factory-secret")  # a TPM someone already owns
    tpm.close()
    d = rig.d
    (d / "trust.bundle").write_bytes(rig.lab.bundle.to_bytes())
    factory = image("1.0.0")
    (d / "image.bin").write_bytes(factory)
    (d / "manifest.suit").write_bytes(rig.lab.release(factory, version="1.0.0", seq=1, counter=1))
    (d / "wrong.auth").write_bytes(b"guess")
    (d / "owner.auth").write_bytes(b"factory-secret")
    base = [
        "agent", "provision", "--config", str(d / "agent.toml"),
        "--trust", str(d / "trust.bundle"), "--vendor", "hvac.example.com",
        "--model", rig.lab.model, "--hw-rev", rig.lab.hw_rev,
        "--factory-image", str(d / "image.bin"), "--factory-manifest", str(d / "manifest.suit"),
        "--serial", "dev-0002", "--csr-out", str(d / "device.csr"),
    ]  # fmt: skip
    rc, _, err = _cli(capsys, *base, "--tpm-owner-auth", str(d / "wrong.auth"))
    assert rc == 1 and err.startswith("otaguard: error E_TPM_AUTH:") and err.count("\n") == 1
    rc, _, err = _cli(capsys, *base, "--identity-key", str(d / "x"), "--identity-cert", "y")
    assert rc == 2 and "E_USAGE" in err  # a TPM device makes its own key
    rc, out, err = _cli(capsys, *base, "--tpm-owner-auth", str(d / "owner.auth"))
    assert rc == 0, err
    csr = x509.load_pem_x509_csr((d / "device.csr").read_bytes())
    assert csr.is_signature_valid
    rc, _, err = _cli(capsys, *base, "--tpm-owner-auth", str(d / "owner.auth"))
    assert rc == 1 and "E_OTP_WRITTEN" in err  # once
    ca_key = ec.generate_private_key(ec.SECP256R1())
    (d / "other.pem").write_bytes(
        _cert("dev-0002", ec.generate_private_key(ec.SECP256R1()).public_key(), ca_key)[0]
    )
    (d / "device.pem").write_bytes(_cert("dev-0002", csr.public_key(), ca_key)[0])
    cfg = str(d / "agent.toml")
    rc, _, err = _cli(
        capsys, "agent", "install-cert", "--config", cfg, "--cert", str(d / "other.pem")
    )
    assert rc == 1 and err.startswith("otaguard: error E_CERT:")
    rc, _, err = _cli(
        capsys, "agent", "install-cert", "--config", cfg, "--cert", str(d / "device.pem")
    )
    assert rc == 0, err
    (d / "cmdline").write_text("otaguard.slot=A ro\n")
    rc, out, err = _cli(capsys, "agent", "status", "--config", cfg, "--json")
    assert rc == 0, err
    st = json.loads(out)
    assert st["storage"] == "tpm" and st["tpm"]["identity_key"] is True
    assert st["counters"]["security"] == 1


def test_cli_without_the_tpm_is_one_line_with_its_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    d = tmp_path / "dev"
    d.mkdir()
    (d / "state").mkdir()
    cfg = write_config(d, device=_device_section(d, f"device:{d / 'tpmrm0'}"))
    for cmd in ("status", "boot-check", "run"):
        rc, _, err = _cli(capsys, "agent", cmd, "--config", str(cfg))
        assert rc == 1 and err.startswith("otaguard: error E_TPM: no TPM:"), err
        assert err.count("\n") == 1


# --- property: the TPM floor under any mix of raises, cuts and restored records ---------------
_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.integers(0, 3), st.integers(0, 2)),
        st.tuples(st.just("cut"), st.integers(0, 3), st.integers(0, 2)),  # TPM raised, no record
        st.tuples(st.just("restore"), st.integers(0, 7), st.just(0)),  # an older record copy
    ),
    max_size=8,
)


def test_counters_never_go_below_anything_ever_raised(
    trig: TpmRig,
) -> None:
    dev = trig.boot(0)
    storage, floor = dev.storage, dev.tpm_store
    assert floor is not None
    record = trig.cfg.state_dir / "counters.rec"

    @settings(max_examples=25, deadline=None)
    @given(ops=_OPS)
    def run(ops: list[tuple[str, int, int]]) -> None:
        start = storage.counters()
        high = (start.security, start.keylist_version)
        copies = [record.read_bytes()]
        for op, a, b in ops:
            cur = storage.counters()
            target = (cur.security + a, cur.keylist_version + b)
            if op == "advance":
                storage.advance(security=target[0], keylist_version=target[1])
                copies.append(record.read_bytes())
            elif op == "cut":
                floor.raise_to(*target)
            else:
                record.write_bytes(copies[a % len(copies)])
            if op != "restore":
                high = (max(high[0], target[0]), max(high[1], target[1]))
            now = storage.counters()
            assert (now.security, now.keylist_version) == high

    run()


# --- the real server: mTLS check-in and certificate renewal with TPM keys ---------------------
def test_tpm_device_checks_in_and_renews_with_tpm_keys(
    swtpm: SoftTpm, hr: Harness, tmp_path: Path
) -> None:
    """Enrollment from the TPM's CSR, a check-in over mTLS with the TPM key against the real
    device listener, then a renewal whose new key is made in the TPM too."""
    tpm = Tpm(swtpm.tcti)
    try:
        ensure_srk(tpm, b"")
        blob = create_identity_key(tpm)
        key = TpmKey(tpm, blob)
        csr = tpm_csr(key, "SN-TPM1")
        key.close()
        e = hr.enroll("SN-TPM1", csr_pem=csr)
        assert e.key_path is None
        store_ = MemoryIdentityStore(Identity(blob, e.cert_path.read_bytes()))
        d = tmp_path / "run"
        d.mkdir()
        (d / "device.pem").write_bytes(e.cert_path.read_bytes())
        (d / "device.key").write_bytes(blob)
        t = HttpsTransport(
            hr.url, ca_file=e.ca_path, cert_file=d / "device.pem", key_file=d / "device.key",
            max_attempts=1, key_loader=tpm_key_loader(tpm),
        )  # fmt: skip
        assert t.checkin({"version": "1.0.0"}) is None  # the server accepted the TPM key
        r = CertRenewal(
            store_, t, clock=SimClock(time.time() + 70 * DAY), new_key=tpm_key_maker(tpm)
        )
        r.checkin(lambda: t.checkin({"version": "1.0.0"}))
        assert r.renew_if_due()
        r.checkin(lambda: t.checkin({"version": "1.0.0"}))  # first use of the new identity
        ident = store_.identity()
        assert ident is not None and ident.pending_key is None and r.counts.committed == 1
        assert ident.device_key != blob and is_tpm_key(ident.device_key)  # a new TPM key
        new_cert = x509.load_pem_x509_certificate(ident.certificate)
        assert new_cert.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) == blob_spki(ident.device_key)
        assert t.checkin({"version": "1.0.0"}) is None
        t.close()
        # a software key file is never presented by a TPM device
        soft = ec.generate_private_key(ec.SECP256R1())
        (d / "soft.key").write_bytes(
            soft.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        with pytest.raises(OtaError) as ei:
            HttpsTransport(
                hr.url, ca_file=e.ca_path, cert_file=d / "device.pem", key_file=d / "soft.key",
                key_loader=tpm_key_loader(tpm),
            )  # fmt: skip
        assert ei.value.code == ErrorCode.TPM_NV
    finally:
        tpm.close()
