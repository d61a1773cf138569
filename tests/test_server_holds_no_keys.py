"""The update server holds no key that can sign firmware, key lists or root documents
(threat 4.3, gap G14).

A realistic world is built at run time: a root key and an operational (firmware + keylist)
key in a signing-keys directory, the fleet CA with its private key in its own directory, the
server's TLS files, a trust bundle. The real ``otaguard server run`` is started with only what
it needs (data directory, CA *certificate*, TLS certificate and key, trust bundle); a release
is uploaded and a key list published through the admin API, and an enrolled device checks in,
downloads and reports over mTLS. Then every byte the server holds or produced (data directory
incl. the SQLite file, its WAL and the blob store, every value of every table, its log, its
command line, environment and open files) is searched for every known private key in every
form: PEM private-key blocks, PKCS#8 / SEC1 DER, the raw Ed25519 seed or P-256 scalar, and hex
and base64 (all three byte alignments, standard and URL-safe alphabets) of each of those.

Controls prove the search can fail: it finds the keys in the directories that do hold them,
every needle is found when planted in junk, and a row planted in a copy of the database is
found by the table scan.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import select
import shutil
import sqlite3
import ssl
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.x509.oid import NameOID

from otaguard.adminclient import AdminClient
from otaguard.crypto.algorithms import HashAlg
from otaguard.crypto.software import SoftwareSigner
from otaguard.manifest.build import build_envelope
from otaguard.manifest.ids import class_id, vendor_id
from otaguard.manifest.model import ManifestInfo
from otaguard.server.pki.ca import FleetCA
from otaguard.server.pki.enroll import Enrollment, enroll_device, issue_server_cert
from otaguard.server.storage import store
from otaguard.server.storage.db import Database, sqlite_url
from otaguard.trust.bundle import TrustBundle
from otaguard.trust.documents import issue_authorization, sign_keylist
from otaguard.trust.model import Role, Scope
from tests.support import server_run_argv

PASS = b"signing-key-passphrase"
CA_PASS = b"fleet-ca-passphrase"
VENDOR = vendor_id("example.com")
MODEL, HW_REV = "gw", "r1"
PEM_PRIVATE = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----")
PEM_MARKER = b"PRIVATE KEY-----"

PrivateKey = ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey


# --- the needles -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Needle:
    label: str  # "<key name>/<form>/<encoding>"
    data: bytes


def _b64_fragments(raw: bytes) -> Iterator[tuple[str, bytes]]:
    """The base64 characters determined by ``raw`` alone, wherever it sits in a longer
    encoded stream: one fragment per byte alignment (0, 1, 2 bytes before it), per alphabet."""
    for shift in range(3):
        start = -(-8 * shift // 6)  # first character holding no bit of the prefix
        end = 8 * (shift + len(raw)) // 6  # last character holding no bit of what follows
        for name, enc in (("b64", base64.b64encode), ("b64url", base64.urlsafe_b64encode)):
            yield f"{name}@{shift}", enc(b"\0" * shift + raw)[start:end]


def encodings(label: str, raw: bytes) -> list[Needle]:
    out = [
        Needle(f"{label}/raw", raw),
        Needle(f"{label}/hex", raw.hex().encode()),
        Needle(f"{label}/HEX", raw.hex().upper().encode()),
    ]
    out += [Needle(f"{label}/{name}", frag) for name, frag in _b64_fragments(raw)]
    return out


def key_needles(name: str, key: PrivateKey) -> list[Needle]:
    nothing = serialization.NoEncryption()
    forms = {
        "pkcs8-der": key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, nothing
        )
    }
    out: list[Needle] = []
    if isinstance(key, ed25519.Ed25519PrivateKey):
        forms["seed"] = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, nothing
        )
    else:
        d = key.private_numbers().private_value
        forms["scalar"] = d.to_bytes(32, "big")
        forms["sec1-der"] = key.private_bytes(
            serialization.Encoding.DER, serialization.PrivateFormat.TraditionalOpenSSL, nothing
        )
        out.append(Needle(f"{name}/scalar/decimal", str(d).encode()))
    for form, raw in forms.items():
        out += encodings(f"{name}/{form}", raw)
    return out


MARKER_NEEDLES = encodings("pem-private-key-marker", PEM_MARKER)


def scan(data: bytes, needles: Iterable[Needle]) -> set[str]:
    """Labels of every needle found in ``data`` (plus any PEM private-key block header).

    Also searched with whitespace and escaped newlines removed: PEM and MIME wrap base64 at
    64/76 characters, and a PEM inside a JSON string has ``\\n`` where the breaks were."""
    views = {
        data,
        data.translate(None, b"\r\n\t "),
        data.replace(b"\\n", b"").translate(None, b"\r\n\t "),
    }
    found = {n.label for n in [*needles, *MARKER_NEEDLES] if any(n.data in v for v in views)}
    if PEM_PRIVATE.search(data):
        found.add("pem-private-key-block")
    return found


def scan_tree(root: Path, needles: list[Needle]) -> dict[str, set[str]]:
    """{relative file path: labels found} for every regular file under ``root``."""
    hits: dict[str, set[str]] = {}
    files = [p for p in root.rglob("*") if p.is_file()]
    assert files, f"nothing to scan under {root}"
    for p in files:
        try:
            data = p.read_bytes()
        except FileNotFoundError:  # e.g. a transient SQLite journal that just went away
            continue
        found = scan(data, needles)
        if found:
            hits[str(p.relative_to(root))] = found
    return hits


def scan_sqlite(path: Path, needles: list[Needle]) -> tuple[dict[str, set[str]], int]:
    """Every text/blob value of every row of every table: values split over overflow pages
    are contiguous here, unlike in the raw file. Returns (hits by table.column, values seen)."""
    hits: dict[str, set[str]] = {}
    seen = 0
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        assert tables
        for table in tables:
            cur = conn.execute(f'SELECT * FROM "{table}"')  # noqa: S608 (names from the schema)
            cols = [c[0] for c in cur.description]
            for row in cur:
                for col, value in zip(cols, row, strict=True):
                    if isinstance(value, str):
                        value = value.encode()
                    if not isinstance(value, bytes):
                        continue
                    seen += 1
                    found = scan(value, needles)
                    if found:
                        hits.setdefault(f"{table}.{col}", set()).update(found)
    finally:
        conn.close()
    return hits, seen


# --- the world ---------------------------------------------------------------------------------
@dataclass
class World:
    keys_dir: Path  # root + operational signing keys (encrypted PKCS#8), never given to the server
    ca_dir: Path  # fleet CA: ca.key (encrypted), ca.pem, ca.json; never given to the server
    device_dir: Path  # the enrolled device's files (its TLS key): on the device, not the server
    server_in: Path  # what the server is given: tls/{server.pem,server.key,ca.pem}, bundle
    data: Path  # the server's --data-dir
    root: SoftwareSigner
    op: SoftwareSigner
    needles: list[Needle]  # every private key except the server's own TLS key
    tls_needles: list[Needle]  # the server's TLS key
    enrollment: Enrollment
    tokens: dict[str, str]


def load_key(path: Path, password: bytes | None) -> PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=password)
    assert isinstance(key, ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey)
    return key


def build_world(tmp: Path) -> World:
    keys_dir, ca_dir, device_dir = tmp / "signing-keys", tmp / "fleet-ca", tmp / "device"
    server_in, data = tmp / "server-config", tmp / "server-data"
    SoftwareSigner.generate(keys_dir / "root.key", "ed25519", PASS)
    SoftwareSigner.generate(keys_dir / "release.key", "p256", PASS)
    root_key = load_key(keys_dir / "root.key", PASS)
    op_key = load_key(keys_dir / "release.key", PASS)
    root, op = SoftwareSigner(root_key), SoftwareSigner(op_key)
    ca = FleetCA.create(ca_dir, passphrase=CA_PASS)
    tls = server_in / "tls"
    issue_server_cert(ca, tls, dns_names=["localhost"], ip_addresses=["127.0.0.1"])
    shutil.copy(ca_dir / "ca.pem", tls / "ca.pem")
    now = int(time.time())
    auth = issue_authorization(
        root,
        op.public_key,
        roles=frozenset({Role.FIRMWARE, Role.KEYLIST}),
        scopes=[Scope(VENDOR)],
        not_before=now - 86400,
        not_after=now + 300 * 86400,
    )
    keylist_v1 = sign_keylist(root, version=1, authorizations=[auth], issued_at=now - 60)
    (server_in / "bundle.cbor").write_bytes(TrustBundle(root.public_key, keylist_v1).to_bytes())
    # Operator-side preparation with the CA key (``fleet enroll``, ``server token-create``):
    # it writes into the server's database, before the server runs.
    data.mkdir()
    db = Database(sqlite_url(data / "otaguard.db"))
    db.upgrade()
    e = enroll_device(
        ca, db, serial="SN-1", model=MODEL, hw_rev=HW_REV, groups=["lab"], out_dir=device_dir
    )
    assert e.key_path is not None
    with db.write() as conn:
        tokens = {
            role: store.create_token(conn, f"{role}-1", role)
            for role in ("release-manager", "operator", "security-officer")
        }
    db.dispose()
    needles = (
        key_needles("root", root_key)
        + key_needles("operational", op_key)
        + key_needles("fleet-ca", load_key(ca_dir / "ca.key", CA_PASS))
        + key_needles("device", load_key(e.key_path, None))
    )
    tls_needles = key_needles("server-tls", load_key(tls / "server.key", None))
    return World(
        keys_dir, ca_dir, device_dir, server_in, data, root, op, needles, tls_needles, e, tokens
    )


def start_server(
    w: World, log: Path, *extra: str, env_extra: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], int, int]:
    tls = w.server_in / "tls"
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTAGUARD_")}
    env.update(env_extra or {})
    with log.open("wb") as err:
        proc = subprocess.Popen(
            server_run_argv(
                w.data, tls, "--trust-bundle", str(w.server_in / "bundle.cbor"), *extra
            ),
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
            cwd=w.server_in,
        )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 60)
    line = proc.stdout.readline().decode() if ready else ""
    if not line.startswith("listening"):
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"server did not start: {line!r} {log.read_text()}")
    ports = dict(part.split("=", 1) for part in line.split()[1:])
    return proc, int(ports["device"].rsplit(":", 1)[1]), int(ports["admin"].rsplit(":", 1)[1])


def release_envelope(signer: SoftwareSigner, image: bytes) -> bytes:
    info = ManifestInfo(
        sequence_number=int(time.time()),
        vendor_id=VENDOR,
        class_id=class_id(VENDOR, MODEL, HW_REV),
        digest_alg=HashAlg.SHA256,
        image_digest=hashlib.sha256(image).digest(),
        image_size=len(image),
        version="1.1.0",
        min_version=None,
        security_counter=2,
        expires=int(time.time()) + 30 * 86400,
        uri=None,
        text={"model": MODEL, "hw_rev": HW_REV},
    )
    return build_envelope(info, [signer])


def exercise(w: World, device_port: int, admin_port: int) -> None:
    """Release upload, key-list publication, assignment; device check-in, downloads, report."""
    image = os.urandom(150_000)
    url = f"https://127.0.0.1:{admin_port}"
    ca_pem = w.server_in / "tls" / "ca.pem"
    with AdminClient.connect(url, token=w.tokens["release-manager"], ca_file=ca_pem) as adm:
        blob = adm.upload_blob(image)["blob"]
        release_id = adm.create_release(release_envelope(w.op, image), blob)["id"]
        # Key list v2 (root-signed), published by the security officer.
        now = int(time.time())
        auth = issue_authorization(
            w.root,
            w.op.public_key,
            roles=frozenset({Role.FIRMWARE, Role.KEYLIST}),
            scopes=[Scope(VENDOR)],
            not_before=now - 86400,
            not_after=now + 300 * 86400,
        )
        v2 = sign_keylist(w.root, version=2, authorizations=[auth], issued_at=now)
        assert adm.as_token(w.tokens["security-officer"]).put_keylist(v2)["version"] == 2
        adm.as_token(w.tokens["operator"]).assign("SN-1", release_id)
    e = w.enrollment
    dev_ctx = ssl.create_default_context(cafile=str(e.ca_path))
    dev_ctx.load_cert_chain(str(e.cert_path), str(e.key_path))
    with httpx.Client(base_url=f"https://127.0.0.1:{device_port}", verify=dev_ctx) as dev:
        body = {
            "version": "1.0.0",
            "security_counter": 1,
            "keylist_version": 1,
            "slot_state": {"active": "A", "pending": None},
            "running_digest": "ab" * 32,
        }
        r = dev.post("/v1/checkin", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["keylist_version"] == 2
        upd = r.json()["update"]
        assert upd is not None and upd["version"] == "1.1.0"
        assert dev.get("/v1/keylist").content == v2
        assert dev.get(upd["manifest_url"]).status_code == 200
        assert dev.get(upd["image_url"]).content == image
        rep = {"report_id": "r-1", "state": "installed", "manifest_digest": upd["manifest_digest"]}
        assert dev.post("/v1/reports", json=rep).status_code == 201


# --- the process --------------------------------------------------------------------------------
def _candidate_paths(values: list[bytes], cwd: Path) -> set[Path]:
    out: set[Path] = set()
    for v in values:
        for part in {v, v.split(b"=", 1)[-1]}:
            if not part:
                continue
            p = Path(os.fsdecode(part))
            p = p if p.is_absolute() else cwd / p
            try:
                if p.is_file():
                    out.add(p.resolve())
            except OSError:
                continue
    return out


def key_files_named_by_process(pid: int, needles: list[Needle]) -> tuple[set[Path], bytes]:
    """Files holding private-key material named on the command line, in the environment or
    open as file descriptors of ``pid``; plus the raw cmdline + environ bytes."""
    proc = Path(f"/proc/{pid}")
    cmdline = (proc / "cmdline").read_bytes()
    environ = (proc / "environ").read_bytes()
    cwd = (proc / "cwd").resolve()
    named = _candidate_paths(cmdline.split(b"\0") + environ.split(b"\0"), cwd)
    for fd in (proc / "fd").iterdir():
        try:
            target = Path(os.readlink(fd))
        except OSError:
            continue
        if target.is_absolute() and target.is_file():
            named.add(target.resolve())
    holding = {p for p in named if scan(p.read_bytes(), needles)}
    return holding, cmdline + b"\0" + environ


# The only private keys the server may hold: its TUF repository's online snapshot and timestamp
# keys (server/storage/tufrepo.py), generated at first start. Root names them for those two
# roles only, so they cannot sign a target, a firmware manifest, a key list or a root (threat
# model 4.3).
ONLINE_KEYS = ("tuf/keys/snapshot.pem", "tuf/keys/timestamp.pem")


def without_online_keys(hits: dict[str, set[str]]) -> dict[str, set[str]]:
    """``hits`` minus the two online TUF keys, which must be there and be none of the known
    keys (only the generic PEM-block labels, no root/operational/CA/device/TLS needle)."""
    rest = dict(hits)
    for name in ONLINE_KEYS:
        labels = rest.pop(name, set())
        assert labels and all(x.startswith("pem-private-key-") for x in labels), (name, labels)
    return rest


# --- the tests ----------------------------------------------------------------------------------
def test_server_holds_no_private_key(tmp_path: Path) -> None:
    w = build_world(tmp_path)
    log = tmp_path / "server.log"
    proc, device_port, admin_port = start_server(w, log)
    try:
        exercise(w, device_port, admin_port)
        assert (w.data / "otaguard.db-wal").exists()  # the WAL is there to be scanned
        running_hits = scan_tree(w.data, w.needles + w.tls_needles)
        holding, proc_bytes = key_files_named_by_process(proc.pid, w.needles + w.tls_needles)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    tls_key = (w.server_in / "tls" / "server.key").resolve()
    # (1) data directory (DB file, WAL, blobs) while running and after a clean stop; DB rows.
    assert without_online_keys(running_hits) == {}
    assert without_online_keys(scan_tree(w.data, w.needles + w.tls_needles)) == {}
    table_hits, values = scan_sqlite(w.data / "otaguard.db", w.needles + w.tls_needles)
    assert table_hits == {}
    assert values > 20  # devices, tokens, releases, blobs, key list, reports were all read
    assert scan(log.read_bytes(), w.needles + w.tls_needles) == set()
    # (2) command line, environment, open files: only the TLS key, and no key material inline.
    assert holding == {tls_key}
    assert scan(proc_bytes, w.needles + w.tls_needles) == set()
    for elsewhere in (w.keys_dir, w.ca_dir, w.device_dir):
        assert str(elsewhere).encode() not in proc_bytes
    assert PASS not in proc_bytes and CA_PASS not in proc_bytes
    # (3) controls: the same scan finds the keys where they are.
    keys_hits = scan_tree(w.keys_dir, w.needles)
    assert set(keys_hits) == {"root.key", "release.key"}
    assert all("pem-private-key-block" in h for h in keys_hits.values())
    ca_hits = scan_tree(w.ca_dir, w.needles)
    assert set(ca_hits) == {"ca.key"}
    device_hits = scan_tree(w.device_dir, w.needles)
    assert set(device_hits) == {"device.key"}
    # unencrypted PKCS#8 PEM: the key's DER is found through its base64 fragment
    assert any(label.startswith("device/pkcs8-der/b64@") for label in device_hits["device.key"])
    tls_hits = scan_tree(w.server_in, w.needles + w.tls_needles)
    assert set(tls_hits) == {"tls/server.key"}
    assert any(
        label.startswith("server-tls/pkcs8-der/b64@") for label in tls_hits["tls/server.key"]
    )


def test_server_with_an_issuing_ca_holds_no_signing_key(tmp_path: Path) -> None:
    """Certificate renewal gives the server the fleet CA (``--issuing-ca-dir``): it then holds
    that key in memory, but still no firmware, key-list or root key, and neither the CA key nor
    a device key reaches its data directory, database or log."""
    w = build_world(tmp_path)
    log = tmp_path / "server.log"
    proc, device_port, admin_port = start_server(
        w,
        log,
        "--issuing-ca-dir",
        str(w.ca_dir),
        env_extra={"OTAGUARD_CA_PASSPHRASE": CA_PASS.decode()},
    )
    new_key = ec.generate_private_key(ec.SECP256R1())
    try:
        exercise(w, device_port, admin_port)
        e = w.enrollment
        dev_ctx = ssl.create_default_context(cafile=str(e.ca_path))
        dev_ctx.load_cert_chain(str(e.cert_path), str(e.key_path))
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, "SN-1"),
                x509.NameAttribute(NameOID.SERIAL_NUMBER, "SN-1"),
            ]
        )
        csr = x509.CertificateSigningRequestBuilder().subject_name(name).sign(new_key, SHA256())
        with httpx.Client(base_url=f"https://127.0.0.1:{device_port}", verify=dev_ctx) as dev:
            r = dev.post("/v1/certificate", content=csr.public_bytes(serialization.Encoding.PEM))
            assert r.status_code == 201, r.text
        holding, proc_bytes = key_files_named_by_process(proc.pid, w.needles + w.tls_needles)
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    every = w.needles + w.tls_needles + key_needles("renewed-device", new_key)
    signing = [n for n in every if n.label.split("/")[0] in ("root", "operational")]
    assert without_online_keys(scan_tree(w.data, every)) == {}
    table_hits, _ = scan_sqlite(w.data / "otaguard.db", every)
    assert table_hits == {}
    assert scan(log.read_bytes(), every) == set()
    assert holding == {(w.server_in / "tls" / "server.key").resolve()}  # ca.key read, closed
    assert scan(proc_bytes, signing) == set()
    assert str(w.keys_dir).encode() not in proc_bytes and PASS not in proc_bytes


def test_control_every_form_of_every_key_is_found(tmp_path: Path) -> None:
    keys: dict[str, PrivateKey] = {
        "ed": ed25519.Ed25519PrivateKey.generate(),
        "p256": ec.generate_private_key(ec.SECP256R1()),
    }
    needles = [n for name, k in keys.items() for n in key_needles(name, k)]
    assert len(needles) > 40
    for n in needles:
        for pad in range(3):  # every base64 alignment of the surrounding junk
            planted = os.urandom(100 + pad) + n.data + os.urandom(50)
            assert n.label in scan(planted, needles), n.label
            # the base64 fragments also match the real encoding of the planted bytes
            if n.label.endswith("/raw"):
                std = base64.b64encode(planted)
                url = base64.urlsafe_b64encode(planted)
                stem = n.label[: -len("/raw")]
                assert any(x.startswith(f"{stem}/b64@") for x in scan(std, needles))
                assert any(x.startswith(f"{stem}/b64url@") for x in scan(url, needles))
    # PEM in every flavour, and nothing in random bytes.
    for fmt in (serialization.PrivateFormat.PKCS8, serialization.PrivateFormat.TraditionalOpenSSL):
        pem = keys["p256"].private_bytes(
            serialization.Encoding.PEM, fmt, serialization.NoEncryption()
        )
        assert "pem-private-key-block" in scan(pem, needles)
        # the DER inside the wrapped base64 is found, also from a JSON string holding the PEM
        der = "pkcs8-der" if fmt is serialization.PrivateFormat.PKCS8 else "sec1-der"
        body = pem.replace(b"PRIVATE KEY", b"XXXXXXX KEY")  # the DER alone must be enough
        for text in (body, json.dumps({"k": body.decode()}).encode()):
            assert any(x.startswith(f"p256/{der}/b64@") for x in scan(text, needles))
    assert scan(os.urandom(1 << 20), needles) == set()
    # A database row holding a key (in a table the server does not have) is found.
    db = tmp_path / "copy.db"
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE t (a TEXT, b BLOB, c INTEGER)")
    seed = keys["ed"].private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    conn.execute("INSERT INTO t VALUES (?, ?, ?)", ("x" * 5000 + seed.hex(), b"\0" * 9000, 1))
    conn.execute("INSERT INTO t VALUES (?, ?, ?)", ("ok", os.urandom(7000) + seed, 2))
    conn.commit()
    conn.close()
    hits, seen = scan_sqlite(db, needles)
    assert seen == 4
    assert hits == {"t.a": {"ed/seed/hex"}, "t.b": {"ed/seed/raw"}}
