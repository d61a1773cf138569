"""The update server with its blobs in an S3-compatible bucket (moto's standalone server, a
real subprocess): devices over real mTLS, two server nodes on one database and one bucket,
and the store's faults as a device and a load balancer see them."""

# ruff: noqa: F811  (pytest fixtures imported from tests.* are redefined as parameters)
from __future__ import annotations

import contextlib
import hashlib
import os
import random
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from otaguard.cli.main import main as cli_main
from otaguard.device.https_transport import HttpsTransport
from otaguard.errors import ErrorCode, OtaError
from otaguard.server.config import load_server_config
from otaguard.server.context import TrustState
from otaguard.server.pki.ca import FleetCA
from otaguard.server.pki.enroll import Enrollment
from otaguard.server.runtime import RunOptions, storage_options
from otaguard.server.storage import store
from otaguard.server.storage.blobs import LocalBlobStore
from otaguard.server.storage.blobs_s3 import S3BlobStore
from otaguard.server.storage.db import Database, sqlite_url
from otaguard.trust.model import StaticKeys
from tests.pg import Harness, fleet_ca, harness, server_tls  # noqa: F401
from tests.s3server import MotoServer, moto_server, s3_env  # noqa: F401
from tests.test_server_api import (
    SIGNER,
    _device_flow,
    admin,
    admin_client,
    make_release,
    publish,
)

FAST = {"connect_timeout": 0.5, "read_timeout": 0.5, "attempts": 1}


@contextlib.contextmanager
def s3_node(
    moto: MotoServer, bucket: str, db: str, ca: FleetCA, tls: Path, tmp: Path
) -> Iterator[Harness]:
    """One server node: its own listeners, process state and verified-blob cache."""
    tmp.mkdir(parents=True, exist_ok=True)
    store = S3BlobStore(
        bucket, spool_dir=tmp / "spool", prefix="blobs/", client=moto.client(**FAST)
    )
    trust = TrustState(StaticKeys([SIGNER.public_key]))
    with harness(db, ca, tls, tmp, trust=trust, blobs=store) as h:
        yield h


def test_device_flow_with_blobs_in_s3(
    s3_env: dict[str, str],
    moto_server: MotoServer,
    fleet_ca: FleetCA,
    server_tls: Path,
    tmp_path: Path,
) -> None:
    """The whole device flow of test_server_api (manifest, full image, a download resumed with
    Range and If-Range, 416, reports, refusals) with every blob in the bucket."""
    bucket = moto_server.new_bucket()
    db = sqlite_url(tmp_path / "s3.db")
    with s3_node(moto_server, bucket, db, fleet_ca, server_tls, tmp_path / "a") as h:
        _device_flow(h)
    keys = moto_server.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert len(keys) == 2 and all(k["Key"].startswith("blobs/") for k in keys)  # image, manifest


def test_any_node_resumes_another_nodes_download_and_faults_are_contained(
    s3_env: dict[str, str],
    fleet_ca: FleetCA,
    server_tls: Path,
    tmp_path: Path,
) -> None:
    moto = MotoServer().start()  # its own: frozen below
    try:
        bucket = moto.new_bucket()
        db = sqlite_url(tmp_path / "s3.db")
        with (
            s3_node(moto, bucket, db, fleet_ca, server_tls, tmp_path / "a") as a,
            s3_node(moto, bucket, db, fleet_ca, server_tls, tmp_path / "b") as b,
        ):
            _two_nodes(moto, bucket, a, b)
    finally:
        moto.stop()


def _two_nodes(moto: MotoServer, bucket: str, a: Harness, b: Harness) -> None:
    image = os.urandom(700_000)  # three pieces
    rm = admin_client(a, "release-manager")
    blob = rm.upload_blob(image)["blob"]
    rid = rm.create_release(make_release("2.0.0", image), blob)["id"]
    e = a.enroll("SN-S3")
    op = admin(a, "operator")
    assert op.post("/admin/v1/assignments", json={"serial": "SN-S3", "release_id": rid}).is_success
    on_a, on_b = a.client(e), b.client(e)
    upd = on_a.post("/v1/checkin", json={"version": "1.0.0"}).json()["update"]
    url = upd["image_url"]

    # Node A sends the first part; the download is cut and resumes on node B, which has
    # never seen the blob: it verifies it from the bucket and serves the rest.
    part1 = on_a.get(url, headers={"Range": "bytes=0-300000"})
    assert part1.status_code == 206
    part2 = on_b.get(url, headers={"Range": "bytes=300001-", "If-Range": part1.headers["etag"]})
    assert part2.status_code == 206 and part2.headers["etag"] == part1.headers["etag"]
    assert part1.content + part2.content == image
    env = on_b.get(upd["manifest_url"])
    assert env.status_code == 200
    assert hashlib.sha256(env.content).hexdigest() == upd["manifest_url"].rsplit("/", 1)[1]

    # Tampered in the bucket: never served by either node (404 E_NOT_FOUND, logged).
    raw = moto.client()
    key = f"blobs/{blob[:2]}/{blob[2:4]}/{blob}"
    evil = bytearray(image)
    evil[400_000] ^= 1
    raw.put_object(Bucket=bucket, Key=key, Body=bytes(evil))
    for dev in (on_a, on_b):
        r = dev.get(url, headers={"Range": "bytes=0-99"})
        assert r.status_code == 404 and r.json()["error"] == "E_NOT_FOUND"
    # Uploading the image again repairs it.
    assert rm.upload_blob(image)["blob"] == blob
    assert on_b.get(url).content == image

    # The bucket hangs: 503 E_STORAGE with Retry-After, health says which check failed.
    moto.freeze()
    try:
        r = on_a.get(url, headers={"Range": "bytes=0-99"})
        assert r.status_code == 503 and r.json()["error"] == "E_STORAGE"
        assert r.headers["retry-after"]
        health = admin(b, "viewer").get("/healthz")
        assert health.status_code == 503 and health.json()["checks"]["blobs"] == "failed"
    finally:
        moto.thaw()
    # Back: the next request works, no restart of either node.
    r = on_a.get(url, headers={"Range": "bytes=0-99"})
    assert r.status_code == 206 and r.content == image[:100]
    assert admin(b, "viewer").get("/healthz").json()["checks"] == {
        "database": "ok",
        "blobs": "ok",
    }


def test_device_resumes_on_another_node_after_the_bucket_came_back(
    s3_env: dict[str, str], fleet_ca: FleetCA, server_tls: Path, tmp_path: Path
) -> None:
    """The device's own HTTPS transport: its download from node A is cut, it resumes on node B
    while the bucket hangs, gets 503 E_STORAGE with Retry-After, waits as told (the store is
    back by then) and finishes the image from where it stopped."""
    moto = MotoServer().start()
    try:
        bucket = moto.new_bucket()
        db = sqlite_url(tmp_path / "s3.db")
        with (
            s3_node(moto, bucket, db, fleet_ca, server_tls, tmp_path / "a") as a,
            s3_node(moto, bucket, db, fleet_ca, server_tls, tmp_path / "b") as b,
        ):
            image = os.urandom(600_000)
            rid = publish(a, "3.0.0", image)
            e = a.enroll("SN-R1")
            admin_client(a, "operator").assign("SN-R1", rid)
            on_a = _transport(a, e, [])
            assert on_a.checkin({"version": "2.0.0", "security_counter": 1}) is not None
            first = b"".join(on_a.open_image(0))[:250_001]  # the link dropped here
            on_a.close()

            waits: list[float] = []

            def sleep(seconds: float) -> None:
                waits.append(seconds)
                moto.thaw()  # the store comes back while the device waits

            on_b = _transport(b, e, waits, sleep=sleep)
            assert on_b.checkin({"version": "2.0.0", "security_counter": 1}) is not None
            moto.freeze()
            rest = b"".join(on_b.open_image(len(first)))
            on_b.close()
            assert first + rest == image
            assert waits and waits[0] >= 5  # Retry-After of the 503 honoured
    finally:
        moto.stop()


def _transport(h: Harness, e: Enrollment, waits: list[float], **kw: Any) -> HttpsTransport:
    return HttpsTransport(
        h.url,
        ca_file=e.ca_path,
        cert_file=e.cert_path,
        key_file=e.key_path,
        sleep=kw.pop("sleep", waits.append),
        rng=random.Random(1),
        **kw,
    )


# --- configuration -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[storage]\nbackend = 'gcs'\n", 'storage.backend must be "local" or "s3"'),
        ("[storage]\nbackend = 3\n", "storage.backend must be a non-empty string"),
        ("[storage]\ns3_bucket = 'Not_A_Bucket'\n", "storage.s3_bucket is not an S3 bucket"),
        ("[storage]\ns3_endpoint_url = 'ftp://x'\n", "storage.s3_endpoint_url must be an http"),
        (
            "[storage]\ns3_endpoint_url = 'http://AKIA:secret@minio:9000'\n",
            "storage.s3_endpoint_url: no credentials in the config",
        ),
        ("[storage]\ns3_region = 'eu west'\n", "storage.s3_region is not a region"),
        ("[storage]\ns3_prefix = '/abs'\n", "storage.s3_prefix must be a relative key prefix"),
        ("[storage]\ns3_prefix = 'a/../b'\n", "storage.s3_prefix must be a relative key prefix"),
        ("[storage]\naws_secret_access_key = 'x'\n", "unknown key storage.aws_secret_access_key"),
    ],
)
def test_bad_storage_config_is_e_config_naming_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    p = tmp_path / "server.toml"
    p.write_text(text)
    with pytest.raises(OtaError) as exc:
        load_server_config(p)
    assert exc.value.code is ErrorCode.CONFIG and message in exc.value.detail


def test_storage_keys_are_the_config_files_keys() -> None:
    from otaguard.server.config import _FIELDS
    from otaguard.server.storage.blob_settings import STORAGE_KEYS

    assert {f: f"{s}.{k}" for (s, k), f in _FIELDS.items() if s == "storage"} == STORAGE_KEYS


def test_storage_options_need_each_other(tmp_path: Path) -> None:
    cfg = tmp_path / "server.toml"
    cfg.write_text(
        "[storage]\nbackend = 's3'\ns3_bucket = 'fleet-blobs'\ns3_prefix = 'a/b'\n"
        "s3_endpoint_url = 'http://127.0.0.1:9000'\ns3_region = 'eu-central-1'\n"
    )
    values = load_server_config(cfg)
    assert values["s3_prefix"] == "a/b/"  # keys go under a/b/ab/cd/<sha256>
    opts = RunOptions(data_dir=tmp_path, ca_cert=tmp_path / "ca.pem", **values)
    assert storage_options(opts)["s3_bucket"] == "fleet-blobs"
    for change, message in [
        ({"s3_bucket": None}, "storage.s3_bucket (--s3-bucket) is required"),
        ({"storage_backend": "local"}, 'storage.s3_bucket needs storage.backend = "s3"'),
        ({"storage_backend": None}, 'storage.s3_bucket needs storage.backend = "s3"'),
        ({"s3_region": "x y"}, "storage.s3_region (--s3-region) is not a region"),
    ]:
        with pytest.raises(OtaError) as exc:
            storage_options(RunOptions(**{**opts.__dict__, **change}))
        assert exc.value.code is ErrorCode.CONFIG and message in exc.value.detail


def test_server_run_refuses_s3_without_a_bucket_before_touching_the_data_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["server", "run", "--data-dir", str(tmp_path / "d"), "--ca-cert", "x.pem"]
    assert cli_main([*argv, "--storage-backend", "s3"]) == 1
    assert "error E_CONFIG: storage.s3_bucket (--s3-bucket) is required" in capsys.readouterr().err
    assert cli_main([*argv, "--s3-prefix", "p/"]) == 1
    assert 'E_CONFIG: storage.s3_prefix needs storage.backend = "s3"' in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_server_process_keeps_blobs_in_the_bucket(
    s3_env: dict[str, str], moto_server: MotoServer, server_tls: Path, tmp_path: Path
) -> None:
    """``otaguard server run`` configured by its file for an S3-compatible store (endpoint,
    bucket, prefix; credentials only in the environment): uploads land in the bucket."""
    bucket = moto_server.new_bucket()
    cfg = tmp_path / "server.toml"
    cfg.write_text(
        f'data_dir = "data"\n[tls]\nca_cert = "{server_tls / "ca.pem"}"\n'
        f'cert = "{server_tls / "server.pem"}"\nkey = "{server_tls / "server.key"}"\n'
        "[device]\nport = 0\n[admin]\nport = 0\n"
        f'[storage]\nbackend = "s3"\ns3_bucket = "{bucket}"\ns3_prefix = "node/"\n'
        f's3_endpoint_url = "{moto_server.url}"\ns3_region = "us-east-1"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "otaguard.cli.main", "server", "run", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **s3_env},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("listening"), proc.stderr.read() if proc.stderr else line
        adm = line.split()[2].split("=")[1]
        db = Database(sqlite_url(tmp_path / "data" / "otaguard.db"))
        with db.write() as conn:
            token = store.create_token(conn, "rm", "release-manager")
        db.dispose()
        ctx = ssl.create_default_context(cafile=str(server_tls / "ca.pem"))
        with httpx.Client(base_url=f"https://{adm}", verify=ctx, timeout=10) as c:
            assert c.get("/healthz").json()["checks"]["blobs"] == "ok"
            image = os.urandom(50_000)
            r = c.post(
                "/admin/v1/images", content=image, headers={"Authorization": f"Bearer {token}"}
            )
            assert r.status_code == 201
        name = hashlib.sha256(image).hexdigest()
        key = f"node/{name[:2]}/{name[2:4]}/{name}"
        got = moto_server.client().get_object(Bucket=bucket, Key=key)
        assert got["Body"].read() == image
        assert not (tmp_path / "data" / "blobs").exists()
    finally:
        proc.terminate()
        proc.wait(20)


def test_migrate_blobs_copies_verified_blobs_and_names_damaged_ones(
    s3_env: dict[str, str],
    moto_server: MotoServer,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    local = LocalBlobStore(tmp_path / "data" / "blobs")
    good = [local.put(os.urandom(n)) for n in (0, 1000, 300_000)]
    bad = local.put(b"will rot")
    local.path(bad).chmod(0o644)
    local.path(bad).write_bytes(b"has rotted")
    truncated = local.put(b"will be cut")
    local.path(truncated).chmod(0o644)
    local.path(truncated).write_bytes(b"")
    bucket = moto_server.new_bucket()
    argv = ["server", "migrate-blobs", "--data-dir", str(tmp_path / "data")]
    argv += ["--s3-bucket", bucket, "--s3-endpoint-url", moto_server.url, "--s3-prefix", "m"]
    assert cli_main(argv) == 1
    out = capsys.readouterr()
    assert f"copied 3 blobs (301000 bytes) to s3://{bucket}, 0 already there" in out.out
    assert "error E_NOT_FOUND: 2 local blobs no longer match their names" in out.err
    assert bad in out.err and truncated in out.err
    s3 = S3BlobStore(bucket, spool_dir=tmp_path / "spool", prefix="m/", client=moto_server.client())
    assert all(s3.verify(name) for name in good)
    assert s3.size(bad) is None and s3.size(truncated) is None
    # Repaired locally, the same command again copies only what is missing.
    local.put(b"will rot")
    local.put(b"will be cut")
    assert cli_main(argv) == 0
    assert f"copied 2 blobs (19 bytes) to s3://{bucket}, 3 already there" in capsys.readouterr().out
    assert s3.read(bad, 100) == b"will rot"
    keys = moto_server.client().list_objects_v2(Bucket=bucket)["Contents"]
    assert len(keys) == 5
