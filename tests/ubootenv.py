"""An independent model of U-Boot's redundant environment, for tests (host and VM).

Written from U-Boot's format and its ``env_import_redund`` rule, not from otaguard's code:
a copy is ``CRC-32 (LE) | flags | NAME=value\\0 ... \\0``, valid when the CRC over everything
after the flags byte matches; of two valid copies flags 0 beats 0xff (wrap), otherwise the
larger flags wins, copy 0 on a tie. ``countdown`` does what files/boot.cmd does when it
starts a pending slot: rewrite the copy it read in place, same flags, one try fewer.
"""

from __future__ import annotations

import zlib

HEADER = 5  # crc32 + flags


def valid(copy: bytes) -> bool:
    return len(copy) > HEADER and zlib.crc32(copy[HEADER:]) == int.from_bytes(copy[:4], "little")


def pick(copy0: bytes, copy1: bytes) -> int | None:
    """Which copy U-Boot uses (0 or 1); None when neither is valid."""
    ok0, ok1 = valid(copy0), valid(copy1)
    if ok0 and ok1:
        f0, f1 = copy0[4], copy1[4]
        if f0 == 0xFF and f1 == 0:
            return 1
        if f1 == 0xFF and f0 == 0:
            return 0
        return 1 if f1 > f0 else 0
    if ok0:
        return 0
    if ok1:
        return 1
    return None


def variables(copy: bytes) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in copy[HEADER:].split(b"\0"):
        if not item:
            break
        name, _, value = item.decode().partition("=")
        out[name] = value
    return out


def read(copy0: bytes, copy1: bytes) -> dict[str, str] | None:
    """The variables U-Boot reads from the pair; None when neither copy is valid."""
    use = pick(copy0, copy1)
    return None if use is None else variables((copy0, copy1)[use])


def encode(env: dict[str, str], size: int, flags: int) -> bytes:
    data = b"".join(f"{k}={v}".encode() + b"\0" for k, v in sorted(env.items())) + b"\0"
    data = data.ljust(size - HEADER, b"\0")
    assert len(data) == size - HEADER, "environment too large"
    return zlib.crc32(data).to_bytes(4, "little") + bytes([flags]) + data


def countdown(copy0: bytes, copy1: bytes, slot: str) -> tuple[bytes, bytes]:
    """boot.cmd starting pending ``slot``: tries - 1 in the copy in force, same flags."""
    use = pick(copy0, copy1)
    assert use is not None
    copies = [copy0, copy1]
    env = variables(copies[use])
    key = f"OG_{slot}_TRIES"
    env[key] = str(max(int(env[key]) - 1, 0))
    copies[use] = encode(env, len(copies[use]), copies[use][4])
    return copies[0], copies[1]
