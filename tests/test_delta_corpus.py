"""Apply-and-verify on real firmware pairs (cached corpus; fetched once via scripts/corpus.sh).

Only the two smallest PyPI pairs run here to keep `make test` cheap; bench/delta.py covers the
whole corpus.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import tracemalloc
from pathlib import Path

import pytest

from otaguard.delta import apply_patch, create_patch, patch_header
from otaguard.errors import DeltaError, ErrorCode
from tests.support import missing

ROOT = Path(__file__).resolve().parents[1]
CORPUS = Path(os.environ.get("OTAGUARD_CORPUS", ROOT / ".cache" / "corpus"))
PAIRS = ("microbit-upy-1.0.0-1.0.1", "pybv11-1f5d945af-dirty")
FETCH_TIMEOUT = 300


def corpus_pair(name: str) -> tuple[Path, Path]:
    pair = CORPUS / "pairs" / name
    if not (pair / "old").is_file() or not (pair / "new").is_file():
        CORPUS.mkdir(parents=True, exist_ok=True)
        # One fetch at a time across xdist workers; the second one finds the cache.
        with open(CORPUS / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (pair / "new").is_file():
                try:
                    subprocess.run(
                        ["bash", str(ROOT / "scripts" / "corpus.sh"), str(CORPUS)],
                        env={**os.environ, "SKIP_DEBIAN": "1"},
                        timeout=FETCH_TIMEOUT,
                        capture_output=True,
                        check=True,
                    )
                except (subprocess.SubprocessError, OSError) as exc:
                    missing(f"delta corpus (scripts/corpus.sh failed: {exc})")
    if not (pair / "new").is_file():
        missing(f"delta corpus pair {name}")
    return pair / "old", pair / "new"


@pytest.mark.parametrize("name", PAIRS)
def test_real_firmware_apply_and_verify(name: str, tmp_path: Path) -> None:
    old_path, new_path = corpus_pair(name)
    old, new = old_path.read_bytes(), new_path.read_bytes()
    patch = create_patch(old, new)
    head = patch_header(patch[:64])
    assert (head.old_size, head.new_size) == (len(old), len(new))
    # A real delta must be far smaller than the image (bsdiff4 alone is ~3% here).
    assert len(patch) < len(new) // 20
    patch_path = tmp_path / "patch"
    patch_path.write_bytes(patch)
    new_sha = hashlib.sha256(new).digest()
    old_sha = hashlib.sha256(old).digest()
    del old
    out_path = tmp_path / "slot_b"
    with (
        open(old_path, "rb") as slot_a,
        open(out_path, "wb") as slot_b,
        open(patch_path, "rb") as p,
    ):

        def read_old(offset: int, length: int) -> bytes:
            slot_a.seek(offset)
            return slot_a.read(length)

        tracemalloc.start()
        try:
            result = apply_patch(
                p,
                read_old,
                slot_b.write,
                old_size=old_path.stat().st_size,
                max_new=1 << 20,
                expected_base_digest=old_sha,
                expected_new_digest=new_sha,
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert result.digest == new_sha and result.new_size == len(new)
    assert out_path.read_bytes() == new
    assert peak < 2 * 1024 * 1024, f"apply peak {peak} B"

    # One flipped bit in the running image: the patch is refused as being for another base.
    wrong = bytearray(old_path.read_bytes())
    wrong[len(wrong) // 2] ^= 0x01
    with pytest.raises(DeltaError) as ei:
        apply_patch(
            [patch],
            lambda o, n: bytes(wrong[o : o + n]),
            lambda _d: None,
            old_size=head.old_size,
            max_new=1 << 20,
        )
    assert ei.value.code == ErrorCode.DELTA_BASE
