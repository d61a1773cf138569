"""moto's standalone S3 server as a real subprocess on 127.0.0.1, for the S3 blob store tests.

The store talks to it over HTTP exactly as to AWS S3, MinIO or Ceph (boto3, path-style
addressing, credentials from the environment). ``freeze``/``thaw`` (SIGSTOP/SIGCONT) make it
accept connections and never answer, the way a hung storage node does; ``stop``/``start``
refuse connections (moto keeps objects in memory: a restart comes back empty).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.support import missing, stop_process

# Dummy credentials, and nothing that could send boto3 anywhere but 127.0.0.1 (no shared
# config files, no instance-metadata lookups).
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "otaguard-test",
    "AWS_SECRET_ACCESS_KEY": "otaguard-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class MotoServer:
    def __init__(self) -> None:
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> MotoServer:
        if importlib.util.find_spec("moto") is None:
            missing("moto[server] (the S3-compatible test server)")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, **S3_ENV},
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return self
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto server did not start") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGCONT)
            stop_process(self.proc)
            self.proc = None

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def client(self, **kw: Any) -> Any:
        from otaguard.server.storage.blobs_s3 import s3_client

        return s3_client(self.url, "us-east-1", **kw)

    def new_bucket(self) -> str:
        name = f"otaguard-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="session")
def moto_server() -> Iterator[MotoServer]:
    srv = MotoServer().start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def s3_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    return S3_ENV
