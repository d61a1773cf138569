"""The TUF repository against python-tuf's own client (ngclient) over real mTLS on 127.0.0.1.

Root and targets keys live in SoftHSM2 and sign through otaguard's PKCS#11 signer (the
securesystemslib adapter); the server signs snapshot and timestamp with its online keys. The
client refreshes, downloads and verifies a target, follows a root rotation that replaces the
targets key (and adds a root key: the new root is signed by the old and the new root keys),
and refuses a freeze, rollbacks and a mix-and-match with python-tuf's own exceptions.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import hashlib
import json
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519
from hypothesis import given, settings
from hypothesis import strategies as st
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import Metadata, Root, Targets
from tuf.ngclient import Updater
from tuf.ngclient.fetcher import FetcherInterface

from otaguard.crypto.algorithms import HashAlg
from otaguard.crypto.cose import Signer
from otaguard.crypto.keys import PublicKey
from otaguard.crypto.pkcs11 import Pkcs11Signer, generate_keypair
from otaguard.crypto.software import SoftwareSigner
from otaguard.errors import ErrorCode, OtaError, PolicyError, ServerError
from otaguard.server.pki.ca import FleetCA
from otaguard.server.storage import store
from otaguard.server.storage.db import sqlite_url
from otaguard.server.storage.tufrepo import DAY, TufRepository, TufSettings
from otaguard.signing.audit import AuditLog, read_records
from otaguard.signing.policy import Grant, Policy, Requester, Role, SigningRequest
from otaguard.signing.service import SigningService
from otaguard.signing.state import SigningState
from otaguard.tufrepo import metadata as tm
from otaguard.tufrepo.signer import TufSigner
from tests.conftest import SoftHsmToken
from tests.pg import Harness, fleet_ca, harness, server_tls  # noqa: F401

pytestmark = pytest.mark.softhsm

TARGET = "gw/r1/image.bin"
WHO = Requester("ci", Role.RELEASE)


class ServerClock:
    """The repository's wall clock (the client keeps real time)."""

    def __init__(self) -> None:
        self.t = int(time.time())

    def __call__(self) -> int:
        return self.t


class MtlsFetcher(FetcherInterface):
    """ngclient's network layer over the device's mTLS identity. ``replace`` plays an on-path
    attacker (or a compromised mirror): for a URL ending in a key, it serves those bytes."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.client = httpx.Client(verify=ctx, timeout=10)
        self.replace: dict[str, bytes] = {}

    def _fetch(self, url: str) -> Iterator[bytes]:
        for suffix, data in self.replace.items():
            if url.endswith(suffix):
                return iter([data])
        r = self.client.get(url)
        if r.status_code != 200:
            raise tuf_exc.DownloadHTTPError(r.text, r.status_code)
        return iter([r.content])


class CountingSigner:
    """Wraps a signer and counts signatures (to show a refusal came before the key)."""

    def __init__(self, inner: Signer) -> None:
        self.inner = inner
        self.calls = 0

    @property
    def public_key(self) -> PublicKey:
        return self.inner.public_key

    @property
    def alg(self):  # type: ignore[no-untyped-def]
        return self.inner.alg

    def sign(self, data: bytes) -> bytes:
        self.calls += 1
        return self.inner.sign(data)


@dataclass
class World:
    h: Harness
    tmp: Path
    clock: ServerClock
    repo: TufRepository
    admin: httpx.Client
    fetcher: MtlsFetcher
    root_a: Signer  # root key v1 (HSM, P-256)
    targets_1: Signer  # release key v1 (HSM, Ed25519)
    state: SigningState
    audit: AuditLog
    services: list[SigningService] = field(default_factory=list)
    counter: int = 1

    def service(self, signer: Signer, policy: Policy | None = None) -> SigningService:
        svc = SigningService(signer, policy or Policy.allow_all(WHO.id), self.audit, self.state)
        self.services.append(svc)
        return svc

    def request(self, version: str, image: bytes, expires_in: int = 30 * DAY) -> SigningRequest:
        return SigningRequest(
            image_digest=hashlib.sha256(image).digest(),
            digest_alg=HashAlg.SHA256,
            image_size=len(image),
            vendor="example.com",
            model="gw",
            hw_rev="r1",
            version=version,
            min_version=None,
            security_counter=self.counter,
            expires=int(time.time()) + expires_in,
            uri=None,
        )

    def sign_release(self, signer: Signer, version: str, image: bytes, **kw: int) -> bytes:
        """SUIT first (the release), then its TUF targets: the one policy and audit path."""
        svc = self.service(signer)
        req = self.request(version, image, **kw)
        svc.sign_release(req, WHO)
        prev = (
            self.repo.metadata_bytes(f"{self.repo.targets.signed.version}.targets.json")
            if self.repo.targets
            else None
        )
        return svc.sign_tuf_targets(req, WHO, prev).data

    def upload_image(self, image: bytes) -> None:
        r = self.admin.post("/admin/v1/images", content=image)
        assert r.status_code == 201, r.text

    def put(self, what: str, data: bytes) -> httpx.Response:
        return self.admin.put(f"/admin/v1/tuf/{what}", content=data)

    def publish(self, signer: Signer, version: str, image: bytes) -> int:
        self.upload_image(image)
        r = self.put("targets", self.sign_release(signer, version, image))
        assert r.status_code == 201, r.text
        return int(r.json()["version"])

    def updater(self, name: str = "client", bootstrap: bytes | None = None) -> Updater:
        d = self.tmp / name
        first = not d.exists()
        (d / "targets").mkdir(parents=True, exist_ok=True)
        if first and bootstrap is None:
            bootstrap = self.repo.metadata_bytes("1.root.json")  # provisioned with the device
        return Updater(
            str(d / "meta"),
            f"{self.h.url}/tuf/",
            str(d / "targets"),
            f"{self.h.url}/tuf/targets/",
            self.fetcher,
            bootstrap=bootstrap if first else None,
        )


_OPEN: list[Pkcs11Signer] = []


@pytest.fixture(autouse=True)
def _close_hsm_sessions() -> Iterator[None]:
    """Close every token session a test opened: SoftHSM2 shows a token created later (the next
    test's) only after the module is re-initialized, which needs no session open."""
    yield
    while _OPEN:
        _OPEN.pop().close()


def hsm_key(tok: SoftHsmToken, label: str, kind: str) -> Signer:
    generate_keypair(tok.uri(), label, kind, pin=tok.pin)  # type: ignore[arg-type]
    signer = Pkcs11Signer.open(tok.uri(label), pin=tok.pin)
    _OPEN.append(signer)
    return signer


def online_keys(w: World) -> dict[str, PublicKey]:
    return w.repo.online_keys()


def make_root(
    w: World,
    signers: list[Signer],
    *,
    version: int,
    root_keys: list[PublicKey],
    targets: list[PublicKey],
    expires: int | None = None,
) -> bytes:
    keys = online_keys(w)
    md = tm.build_root(
        version=version,
        expires=expires or int(time.time()) + 365 * DAY,
        root_keys=root_keys,
        root_threshold=len(root_keys),
        targets_keys=targets,
        targets_threshold=1,
        snapshot_key=keys["snapshot"],
        timestamp_key=keys["timestamp"],
    )
    return tm.sign(md, [TufSigner(s) for s in signers])


@pytest.fixture
def world(
    fleet_ca: FleetCA, server_tls: Path, tmp_path: Path, softhsm_token: SoftHsmToken
) -> Iterator[World]:
    clock = ServerClock()
    with harness(sqlite_url(tmp_path / "otaguard.db"), fleet_ca, server_tls, tmp_path) as h:
        repo = TufRepository(tmp_path / "tuf-server", clock=clock)
        h.srv.tuf = repo
        dev = h.enroll("SN-TUF-1")
        with h.db.write() as conn:
            token = store.create_token(conn, "ops", "security-officer")
        admin = h.client(None, headers={"Authorization": f"Bearer {token}"})
        ctx = ssl.create_default_context(cafile=str(dev.ca_path))
        ctx.load_cert_chain(str(dev.cert_path), str(dev.key_path))
        fetcher = MtlsFetcher(ctx)
        state = SigningState(tmp_path / "signing.sqlite")
        audit = AuditLog.open(tmp_path / "audit.log", None)
        w = World(
            h,
            tmp_path,
            clock,
            repo,
            admin,
            fetcher,
            hsm_key(softhsm_token, "root-a", "p256"),
            hsm_key(softhsm_token, "release-1", "ed25519"),
            state,
            audit,
        )
        root = make_root(
            w,
            [w.root_a],
            version=1,
            root_keys=[w.root_a.public_key],
            targets=[w.targets_1.public_key],
        )
        r = w.put("root", root)
        assert r.status_code == 201, r.text
        try:
            yield w
        finally:
            for svc in w.services[-1:]:
                svc.close()
            fetcher.client.close()
            state.close()


def test_ngclient_downloads_verifies_and_follows_a_targets_key_rotation(
    world: World, softhsm_token: SoftHsmToken
) -> None:
    w = world
    image1 = b"\x11" * 5000
    w.publish(w.targets_1, "1.0.0", image1)
    up = w.updater()
    up.refresh()
    info = up.get_targetinfo(TARGET)
    assert info is not None and info.length == len(image1)
    assert info.unrecognized_fields["custom"]["otaguard"]["version"] == "1.0.0"
    path = up.download_target(info)
    assert Path(path).read_bytes() == image1

    # Rotation: a new targets key (HSM, P-256) and a second root key; root v2 is signed by
    # the old root key and by both new root keys, as a client checks it.
    targets_2 = hsm_key(softhsm_token, "release-2", "p256")
    root_b = SoftwareSigner(ed25519.Ed25519PrivateKey.generate())
    new_roots = [w.root_a.public_key, root_b.public_key]
    # Signed by the new root keys only: the server refuses it (a client would too).
    only_new = make_root(
        w, [root_b], version=2, root_keys=[root_b.public_key], targets=[targets_2.public_key]
    )
    r = w.put("root", only_new)
    assert r.status_code == 400 and r.json()["error"] == "E_SIGNATURE"
    root2 = make_root(
        w, [w.root_a, root_b], version=2, root_keys=new_roots, targets=[targets_2.public_key]
    )
    r = w.put("root", root2)
    assert r.status_code == 201 and r.json()["version"] == 2
    # The retired release key cannot publish any more; the new one can.
    w.counter = 2
    image2 = b"\x22" * 7000
    w.upload_image(image2)
    stale = w.sign_release(w.targets_1, "1.1.0", image2)
    r = w.put("targets", stale)
    assert r.status_code == 400 and r.json()["error"] == "E_SIGNATURE"
    w.counter = 3
    w.publish(targets_2, "1.2.0", image2)

    up = w.updater()  # the same device, its trusted metadata on disk
    up.refresh()
    assert (
        Metadata[Root].from_file(str(w.tmp / "client" / "meta" / "root.json")).signed.version == 2
    )
    info = up.get_targetinfo(TARGET)
    assert info is not None
    assert info.unrecognized_fields["custom"]["otaguard"]["version"] == "1.2.0"
    assert Path(up.download_target(info)).read_bytes() == image2


def test_ngclient_refuses_a_frozen_timestamp(world: World) -> None:
    """A server (or mirror) whose timestamp stopped being refreshed three days ago."""
    w = world
    w.clock.t -= 3 * DAY
    w.publish(w.targets_1, "1.0.0", b"\x33" * 100)
    with pytest.raises(tuf_exc.ExpiredMetadataError):
        w.updater().refresh()
    # Control: once the server's clock is right, it re-signs the timestamp on demand.
    w.clock.t += 3 * DAY
    w.updater("fresh").refresh()


def test_ngclient_refuses_rollback_and_mix_and_match(world: World) -> None:
    w = world
    w.publish(w.targets_1, "1.0.0", b"\x44" * 100)
    old = {
        "timestamp": w.repo.timestamp_bytes(),
        "snapshot": w.repo.metadata_bytes(f"{w.repo.snapshot.signed.version}.snapshot.json"),  # type: ignore[union-attr]
        "targets": w.repo.metadata_bytes(f"{w.repo.targets.signed.version}.targets.json"),  # type: ignore[union-attr]
    }
    w.counter = 2
    w.publish(w.targets_1, "1.1.0", b"\x55" * 100)
    snap_v = w.repo.snapshot.signed.version  # type: ignore[union-attr]
    targets_v = w.repo.targets.signed.version  # type: ignore[union-attr]
    up = w.updater()
    up.refresh()  # the device now trusts the newest versions

    # Rollback: the old timestamp, to a device that has seen the new one.
    w.fetcher.replace = {"/tuf/timestamp.json": old["timestamp"]}
    with pytest.raises(tuf_exc.BadVersionNumberError):
        w.updater().refresh()
    # Rollback of the snapshot, to a new device: the timestamp names the current one.
    w.fetcher.replace = {f"/tuf/{snap_v}.snapshot.json": old["snapshot"]}
    with pytest.raises(tuf_exc.BadVersionNumberError):
        w.updater("new-1").refresh()
    # Mix-and-match: current timestamp and snapshot with the old targets.
    w.fetcher.replace = {f"/tuf/{targets_v}.targets.json": old["targets"]}
    with pytest.raises(tuf_exc.BadVersionNumberError):
        w.updater("new-2").refresh()
    # Control: without the attacker the same fresh device gets the current release.
    w.fetcher.replace = {}
    up = w.updater("new-3")
    up.refresh()
    info = up.get_targetinfo(TARGET)
    assert info is not None and info.unrecognized_fields["custom"]["otaguard"]["version"] == "1.1.0"


def test_upload_refusals_store_nothing(world: World) -> None:
    w = world
    image = b"\x66" * 100
    # Malformed / not TUF / wrong role: typed 400, never a 500.
    for body, code in (
        (b"{not json", "E_MALFORMED"),
        (b'{"signed": {}, "signatures": []}', "E_MALFORMED"),
        (w.repo.metadata_bytes("1.root.json"), "E_MALFORMED"),
    ):
        r = w.put("targets", body)
        assert r.status_code == 400 and r.json()["error"] == code, r.text
    # Signed by a key the root does not name for targets.
    w.upload_image(image)
    rogue = SoftwareSigner(ed25519.Ed25519PrivateKey.generate())
    w.service(rogue)  # the rogue key's own service signs the SUIT release...
    data = w.sign_release(rogue, "1.0.0", image)
    r = w.put("targets", data)
    assert r.status_code == 400 and r.json()["error"] == "E_SIGNATURE"
    # Image not uploaded first.
    w.counter = 2
    r = w.put("targets", w.sign_release(w.targets_1, "1.0.1", b"\x67" * 10))
    assert r.status_code == 409 and r.json()["error"] == "E_NOT_FOUND"
    assert w.repo.targets is None
    r = w.fetcher.client.get(f"{w.h.url}/tuf/timestamp.json")
    assert r.status_code == 404 and r.json()["error"] == "E_NOT_FOUND"
    # Accepted once; the same document again is a replay.
    w.counter = 3
    data = w.sign_release(w.targets_1, "1.0.2", image)
    assert w.put("targets", data).status_code == 201
    r = w.put("targets", data)
    assert r.status_code == 409 and r.json()["error"] == "E_REPLAY"
    # Root: the next version must follow, and name this server's online keys.
    r = w.put("root", w.repo.metadata_bytes("1.root.json"))
    assert r.status_code == 409 and r.json()["error"] == "E_REPLAY"
    md = Metadata[Root].from_bytes(
        make_root(
            w,
            [w.root_a],
            version=2,
            root_keys=[w.root_a.public_key],
            targets=[w.targets_1.public_key],
        )
    )
    other = TufSigner(SoftwareSigner(ed25519.Ed25519PrivateKey.generate())).public_key
    md.signed.revoke_key(next(iter(md.signed.roles["timestamp"].keyids)), "timestamp")
    md.signed.add_key(other, "timestamp")
    md.signatures.clear()
    r = w.put("root", tm.sign(md, [TufSigner(w.root_a)]))
    assert r.status_code == 409 and r.json()["error"] == "E_UNTRUSTED_KEY"
    # Only the release manager / security officer may publish.
    with w.h.db.write() as conn:
        viewer = store.create_token(conn, "view", "viewer")
    r = w.admin.put(
        "/admin/v1/tuf/targets", content=data, headers={"Authorization": f"Bearer {viewer}"}
    )
    assert r.status_code == 403 and r.json()["error"] == "E_FORBIDDEN"


def test_targets_expiry_beyond_policy_is_refused(world: World) -> None:
    w = world
    image = b"\x77" * 100
    w.upload_image(image)
    # Server side: the repository's limit (here 10 days) is below the targets' 30.
    w.repo.settings = TufSettings(max_targets_validity=10 * DAY)
    r = w.put("targets", w.sign_release(w.targets_1, "1.0.0", image))
    assert r.status_code == 400 and r.json()["error"] == "E_POLICY"
    assert w.repo.targets is None
    # Signing side: the policy allows the SUIT release (366 days)... then is tightened; the
    # TUF request is refused before the key signs anything, and the refusal is audited.
    w.counter = 2
    counting = CountingSigner(w.targets_1)
    svc = w.service(counting)  # type: ignore[arg-type]
    req = w.request("1.1.0", image, expires_in=60 * DAY)
    svc.sign_release(req, WHO)
    strict = Policy({WHO.id: (Grant("*"),)}, max_validity_days=30)
    svc2 = w.service(counting, strict)  # type: ignore[arg-type]
    before = counting.calls
    with pytest.raises(PolicyError) as exc:
        svc2.sign_tuf_targets(req, WHO)
    assert exc.value.code == ErrorCode.POLICY
    assert counting.calls == before
    records = list(read_records(w.tmp / "audit.log"))
    assert records[-1].op == "sign-refused" and records[-1].subject["error"] == "E_POLICY"
    # And TUF targets for a release that was never signed: refused the same way.
    with pytest.raises(PolicyError) as exc:
        svc2.sign_tuf_targets(w.request("9.9.9", b"nope"), WHO)
    assert exc.value.code == ErrorCode.POLICY


def test_signed_targets_are_audited_once_and_verify(world: World) -> None:
    w = world
    image = b"\x88" * 64
    data = w.sign_release(w.targets_1, "1.0.0", image)
    recs = [r for r in read_records(w.tmp / "audit.log") if r.op == "sign-tuf-targets"]
    assert len(recs) == 1
    s = recs[0].subject
    assert s["targets_sha256"] == hashlib.sha256(data).hexdigest()
    assert s["targets_paths"] == [TARGET] and s["image_digest"] == hashlib.sha256(image).hexdigest()
    md = Metadata[Targets].from_bytes(data)
    assert md.signed.version == s["sequence"]
    root = Metadata[Root].from_bytes(w.repo.metadata_bytes("1.root.json"))
    root.signed.verify_delegate("targets", md.signed_bytes, md.signatures)
    # the digest covers the whole document: one changed byte and the server refuses it
    obj = json.loads(data)
    obj["signed"]["targets"][TARGET]["length"] += 1
    r = w.put("targets", json.dumps(obj).encode())
    assert r.status_code == 400 and r.json()["error"] == "E_SIGNATURE"


def test_root_and_path_checks_are_typed() -> None:
    with pytest.raises(OtaError) as exc:
        tm.target_path("../etc", "r1")
    assert exc.value.code == ErrorCode.USAGE
    k = SoftwareSigner(ed25519.Ed25519PrivateKey.generate()).public_key
    with pytest.raises(OtaError) as exc:
        tm.build_root(
            version=1, expires=int(time.time()) + DAY, root_keys=[k], root_threshold=1,
            targets_keys=[k], targets_threshold=1, snapshot_key=k, timestamp_key=k,
        )  # fmt: skip
    assert exc.value.code == ErrorCode.USAGE


def test_bench_tuf_section_runs_ngclient_verification(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """bench/manifest.py's TUF rows come from metadata ngclient accepts (it asserts the
    target), and name bytes and time per update next to SUIT."""
    from bench.manifest import tuf_update_section

    tuf_update_section(386, 100.0, rounds=1, batch=1)
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| TUF timestamp + "))
    per_update = int(row.split("|")[2])
    assert 1000 < per_update < 4000


def test_server_config_sets_the_tuf_limits(tmp_path: Path) -> None:
    from otaguard.server.config import load_server_config
    from otaguard.server.runtime import RunOptions

    cfg = tmp_path / "server.toml"
    cfg.write_text("[tuf]\ntimestamp_hours = 6\nmax_targets_days = 30\n")
    values = load_server_config(cfg)
    opts = RunOptions(data_dir=tmp_path, ca_cert=tmp_path / "ca.pem", **values)
    assert (opts.tuf_timestamp_hours, opts.tuf_max_targets_days) == (6, 30)
    for text in ("[tuf]\ntimestamp_hours = 0\n", "[tuf]\nmax_targets_days = '30'\n"):
        cfg.write_text(text)
        with pytest.raises(OtaError) as exc:
            load_server_config(cfg)
        assert exc.value.code == ErrorCode.CONFIG and "tuf." in exc.value.detail


def test_timestamp_is_resigned_when_half_its_life_is_gone(world: World) -> None:
    w = world
    w.publish(w.targets_1, "1.0.0", b"\x99" * 10)
    first = Metadata.from_bytes(w.repo.timestamp_bytes()).signed
    w.clock.t += DAY // 2 - 60  # still more than half left: the same document
    assert Metadata.from_bytes(w.repo.timestamp_bytes()).signed.version == first.version
    w.clock.t += 120
    again = Metadata.from_bytes(w.repo.timestamp_bytes()).signed
    assert again.version == first.version + 1
    assert tm.posix(again.expires) == w.clock.t + DAY
    # The online keys are owner-only files in an owner-only directory.
    for role in ("snapshot", "timestamp"):
        assert (w.repo.dir / "keys" / f"{role}.pem").stat().st_mode & 0o077 == 0
    assert (w.repo.dir / "keys").stat().st_mode & 0o077 == 0
    # A restarted server reads the same state back (and keeps its online keys).
    reopened = TufRepository(w.repo.dir, clock=w.clock)
    assert reopened.online_keys() == w.repo.online_keys()
    assert reopened.timestamp_bytes() == w.repo.timestamp_bytes()


_ROOT_KEY = SoftwareSigner(ed25519.Ed25519PrivateKey.generate())
_RELEASE_KEY = SoftwareSigner(ed25519.Ed25519PrivateKey.generate())
_NOW = 1_800_000_000


def _signed_pair() -> tuple[Metadata[Root], bytes]:
    online = SoftwareSigner(ed25519.Ed25519PrivateKey.generate()).public_key
    online2 = SoftwareSigner(ed25519.Ed25519PrivateKey.generate()).public_key
    root = tm.build_root(
        version=1, expires=_NOW + 365 * DAY, root_keys=[_ROOT_KEY.public_key], root_threshold=1,
        targets_keys=[_RELEASE_KEY.public_key], targets_threshold=1, snapshot_key=online,
        timestamp_key=online2,
    )  # fmt: skip
    root_md = tm.check_first_root(tm.sign(root, [TufSigner(_ROOT_KEY)]), _NOW)
    targets = tm.build_targets(
        version=7, expires=_NOW + 30 * DAY, path=TARGET, length=100, sha256=b"\x01" * 32,
        custom=tm.target_custom(version="1.0.0", security_counter=1, model="gw", hw_rev="r1",
                                sequence=7),
    )  # fmt: skip
    return root_md, tm.sign(targets, [TufSigner(_RELEASE_KEY)])


_PAIR = _signed_pair()


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_mutated_targets_are_refused_with_a_code_or_mean_the_same(data: st.DataObject) -> None:
    """Any byte changed, dropped or inserted: an OtaError with a code, or (a hex digit's case,
    say) a document whose signed part is exactly the original's. Never another exception."""
    root, doc = _PAIR
    original = Metadata[Targets].from_bytes(doc).signed_bytes
    i = data.draw(st.integers(0, len(doc) - 1))
    kind = data.draw(st.sampled_from(["flip", "drop", "insert"]))
    b = data.draw(st.integers(0, 255))
    if kind == "flip":
        mutated = doc[:i] + bytes([doc[i] ^ (b or 1)]) + doc[i + 1 :]
    elif kind == "drop":
        mutated = doc[:i] + doc[i + 1 :]
    else:
        mutated = doc[:i] + bytes([b]) + doc[i:]
    try:
        md = tm.check_targets(root, mutated, _NOW, 366 * DAY, 0)
    except OtaError as err:
        assert err.code in {
            ErrorCode.MALFORMED, ErrorCode.SIGNATURE, ErrorCode.EXPIRED, ErrorCode.POLICY,
            ErrorCode.REPLAY, ErrorCode.UNSUPPORTED, ErrorCode.TOO_LARGE,
        }  # fmt: skip
        return
    assert md.signed_bytes == original


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600) | st.text(max_size=300).map(str.encode))
def test_arbitrary_bytes_are_refused_with_a_code(blob: bytes) -> None:
    root, _ = _PAIR
    with pytest.raises(OtaError) as exc:
        tm.check_targets(root, blob, _NOW, 366 * DAY, 0)
    assert exc.value.code in {ErrorCode.MALFORMED, ErrorCode.SIGNATURE}


def test_online_keys_in_the_hsm(tmp_path: Path, softhsm_token: SoftHsmToken) -> None:
    """Snapshot and timestamp keys given as PKCS#11 signers: nothing in keys/, and what they
    sign verifies under a root naming them (Ed25519 and P-256 through the adapter)."""
    snap, stamp = hsm_key(softhsm_token, "snap", "ed25519"), hsm_key(softhsm_token, "ts", "p256")
    repo = TufRepository(tmp_path / "repo", online={"snapshot": snap, "timestamp": stamp})
    assert not (tmp_path / "repo" / "keys").exists()
    assert repo.online_keys() == {"snapshot": snap.public_key, "timestamp": stamp.public_key}
    root = tm.build_root(
        version=1, expires=int(time.time()) + DAY, root_keys=[_ROOT_KEY.public_key],
        root_threshold=1, targets_keys=[_RELEASE_KEY.public_key], targets_threshold=1,
        snapshot_key=snap.public_key, timestamp_key=stamp.public_key,
    )  # fmt: skip
    repo.put_root(tm.sign(root, [TufSigner(_ROOT_KEY)]))
    targets = tm.build_targets(
        version=3, expires=int(time.time()) + DAY, path=TARGET, length=1,
        sha256=b"\x02" * 32, custom={},
    )  # fmt: skip
    repo.put_targets(tm.sign(targets, [TufSigner(_RELEASE_KEY)]), lambda _: True)
    trusted = Metadata[Root].from_bytes(repo.metadata_bytes("1.root.json")).signed
    for role, data in (
        ("timestamp", repo.timestamp_bytes()),
        ("snapshot", repo.metadata_bytes("1.snapshot.json")),
    ):
        md = Metadata.from_bytes(data)
        trusted.verify_delegate(role, md.signed_bytes, md.signatures)
    with pytest.raises(OtaError) as exc:
        TufRepository(tmp_path / "r2", online={"snapshot": snap})
    assert exc.value.code == ErrorCode.USAGE
    with pytest.raises(OtaError) as exc:
        TufRepository(tmp_path / "r3", online={"snapshot": snap, "timestamp": snap})
    assert exc.value.code == ErrorCode.USAGE


def test_server_run_needs_both_online_key_uris(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from otaguard.cli.main import main

    (tmp_path / "ca.pem").write_text("not used before the check")
    argv = ["server", "run", "--data-dir", str(tmp_path / "d"), "--ca-cert",
            str(tmp_path / "ca.pem"), "--tuf-snapshot-pkcs11-uri",
            "pkcs11:token=x;object=s"]  # fmt: skip
    assert main(argv) == 2
    assert "--tuf-timestamp-pkcs11-uri" in capsys.readouterr().err


def test_moving_the_online_keys_into_an_hsm(tmp_path: Path, softhsm_token: SoftHsmToken) -> None:
    """File keys → HSM keys: until a root names the new keys the server keeps serving what the
    old ones signed; the root upload re-signs snapshot and timestamp at once."""
    d = tmp_path / "repo"
    old = TufRepository(d)
    keys = old.online_keys()

    def root(version: int, snap: PublicKey, stamp: PublicKey) -> bytes:
        md = tm.build_root(
            version=version, expires=int(time.time()) + DAY, root_keys=[_ROOT_KEY.public_key],
            root_threshold=1, targets_keys=[_RELEASE_KEY.public_key], targets_threshold=1,
            snapshot_key=snap, timestamp_key=stamp,
        )  # fmt: skip
        return tm.sign(md, [TufSigner(_ROOT_KEY)])

    old.put_root(root(1, keys["snapshot"], keys["timestamp"]))
    targets = tm.build_targets(
        version=3, expires=int(time.time()) + DAY, path=TARGET, length=1,
        sha256=b"\x02" * 32, custom={},
    )  # fmt: skip
    old.put_targets(tm.sign(targets, [TufSigner(_RELEASE_KEY)]), lambda _: True)
    before = old.timestamp_bytes()
    snap, stamp = hsm_key(softhsm_token, "snap", "p256"), hsm_key(softhsm_token, "ts", "ed25519")
    new = TufRepository(d, online={"snapshot": snap, "timestamp": stamp})
    assert new.timestamp_bytes() == before  # the root does not name the HSM keys yet
    assert new.put_root(root(2, snap.public_key, stamp.public_key)) == 2
    trusted = Metadata[Root].from_bytes(new.metadata_bytes("2.root.json")).signed
    ts = Metadata.from_bytes(new.timestamp_bytes())
    trusted.verify_delegate("timestamp", ts.signed_bytes, ts.signatures)
    assert ts.signed.version == Metadata.from_bytes(before).signed.version + 1
    # A restart with the same keys changes nothing.
    again = TufRepository(d, online={"snapshot": snap, "timestamp": stamp})
    assert again.timestamp_bytes() == new.timestamp_bytes()


def test_targets_without_a_sha256_are_unsupported() -> None:
    from tuf.api.metadata import TargetFile

    root, _ = _PAIR
    md = tm.build_targets(
        version=9, expires=_NOW + DAY, path=TARGET, length=1, sha256=b"\x03" * 32, custom={}
    )
    md.signed.targets[TARGET] = TargetFile(1, {"sha512": "ab" * 64}, TARGET)
    with pytest.raises(OtaError) as exc:
        tm.check_targets(root, tm.sign(md, [TufSigner(_RELEASE_KEY)]), _NOW, 366 * DAY, 0)
    assert exc.value.code == ErrorCode.UNSUPPORTED


def test_cli_publishes_through_the_admin_api(
    world: World,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`otaguard tuf online-keys` / `tuf publish-targets` over the typed admin client (no curl):
    the published image is what ngclient then downloads; a viewer is refused in one line."""
    from otaguard.cli.main import main

    w = world
    assert w.h.admin_server is not None
    common = ["--server", w.h.admin_server.url, "--ca-file", str(w.tmp / "tls" / "ca.pem")]
    monkeypatch.setenv("OTAGUARD_ADMIN_TOKEN", w.admin.headers["Authorization"].split()[1])
    online = tmp_path / "online.json"
    assert main(["tuf", "online-keys", "--out", str(online), *common]) == 0
    keys = json.loads(online.read_text())
    assert {r: k.to_pem().decode() for r, k in w.repo.online_keys().items()} == keys
    image = b"\x44" * 3000
    img, targets = tmp_path / "image.bin", tmp_path / "targets.json"
    img.write_bytes(image)
    targets.write_bytes(w.sign_release(w.targets_1, "1.0.0", image))
    capsys.readouterr()
    argv = ["tuf", "publish-targets", str(targets), "--image", str(img), *common, "--json"]
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["version"] >= 1
    up = w.updater()
    up.refresh()
    info = up.get_targetinfo(TARGET)
    assert info is not None and Path(up.download_target(info)).read_bytes() == image
    with w.h.db.write() as conn:
        monkeypatch.setenv("OTAGUARD_ADMIN_TOKEN", store.create_token(conn, "v", "viewer"))
    assert main(["tuf", "publish-targets", str(targets), *common]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("otaguard: error E_FORBIDDEN")


def test_processes_sharing_the_directory_see_each_others_writes(world: World) -> None:
    """The processes of one node (``server run --workers``) each hold a repository object on
    the same directory: what one publishes or re-signs, the others serve, and a timestamp
    due for re-signing is re-signed once, not once per process."""
    w = world
    other = TufRepository(w.repo.dir, clock=w.clock)  # a worker, started before the upload
    w.publish(w.targets_1, "1.0.0", b"\x5a" * 64)  # through the first process
    image = hashlib.sha256(b"\x5a" * 64).hexdigest()
    served = w.repo.timestamp_bytes()
    assert other.timestamp_bytes() == served
    assert other.target_blob(_target_path(image)) == image
    first = Metadata.from_bytes(served).signed.version
    w.clock.t += DAY // 2 + 60  # due for re-signing: the worker is asked first
    resigned = other.timestamp_bytes()
    assert Metadata.from_bytes(resigned).signed.version == first + 1
    assert w.repo.timestamp_bytes() == resigned  # the first process serves it, not its own
    assert other.timestamp_bytes() == resigned
    # A new targets version published by the first process replaces what the worker serves.
    w.counter += 1
    w.publish(w.targets_1, "1.1.0", b"\x5b" * 64)
    newer = hashlib.sha256(b"\x5b" * 64).hexdigest()
    assert other.target_blob(_target_path(newer)) == newer
    with pytest.raises(ServerError):
        other.target_blob(_target_path(image))
    assert other.timestamp_bytes() == w.repo.timestamp_bytes()


def _target_path(digest: str) -> str:
    """A consistent-snapshot target path: ``dir/<sha256>.<name>``."""
    head, _, name = TARGET.rpartition("/")
    return f"{head}/{digest}.{name}"
