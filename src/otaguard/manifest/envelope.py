"""SUIT_Envelope structure: the outer map, the authentication wrapper, and raw byte spans.

Digests in SUIT cover the *encoded* bstr of an element (head + content) exactly as it sits in
the envelope. This module therefore keeps the received bytes of every envelope member next to
the decoded value, so verification hashes what arrived and never a re-serialisation. Nothing
here authenticates anything; :mod:`.verify` does, in the order the profile demands.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .. import cbor
from ..crypto.algorithms import HASH_SIZES, HashAlg, hash_alg
from ..errors import ErrorCode, FormatError
from . import suit

MAX_ENVELOPE_SIZE = 64 * 1024
MAX_AUTH_BLOCKS = 8
# The envelope keeps nested documents in byte strings, so its own tree is shallow; integrated
# dependencies are re-parsed with the same limits when someone asks for them.
ENVELOPE_DEPTH = 8
ENVELOPE_ITEMS = 256
NESTED_DEPTH = 16
NESTED_ITEMS = 2048

Key = int | str


# Nested elements are slices of an envelope that already passed its size limit, so one shared
# Limits object (built once, not per call: this is on the device's hot path) is enough.
NESTED_LIMITS = cbor.Limits(
    max_size=MAX_ENVELOPE_SIZE, max_depth=NESTED_DEPTH, max_items=NESTED_ITEMS
)
ENVELOPE_LIMITS = cbor.Limits(
    max_size=MAX_ENVELOPE_SIZE, max_depth=ENVELOPE_DEPTH, max_items=ENVELOPE_ITEMS
)


def loads_nested(data: bytes, what: str) -> Any:
    """Decode a bstr-wrapped SUIT element with the strict codec, naming it in errors."""
    try:
        return cbor.loads(data, NESTED_LIMITS)
    except FormatError as err:
        raise FormatError(err.code, f"{what}: {err.detail}") from None


@dataclass(frozen=True)
class RawEnvelope:
    data: bytes  # the whole envelope as received
    tagged: bool
    members: dict[Key, Any]  # decoded member values (bstr members stay bytes)
    spans: dict[Key, bytes]  # each member value's encoded bytes (head + content) as received

    @property
    def keys(self) -> list[Key]:
        return list(self.members)


@dataclass(frozen=True)
class AuthWrapper:
    digest_bytes: bytes  # the encoded SUIT_Digest: the detached COSE payload
    digest_alg: HashAlg
    digest: bytes
    blocks: tuple[bytes, ...]  # encoded SUIT_Authentication_Blocks (COSE structures)


# --- raw scanning ---------------------------------------------------------------------------
def _head(data: bytes, pos: int) -> tuple[int, int, int]:
    """(major, argument, next_pos). Input was already checked well-formed and definite."""
    ib = data[pos]
    major, ai = ib >> 5, ib & 0x1F
    pos += 1
    if ai < 24:
        return major, ai, pos
    width = 1 << (ai - 24)
    return major, int.from_bytes(data[pos : pos + width], "big"), pos + width


def _item_end(data: bytes, pos: int) -> int:
    major, arg, pos = _head(data, pos)
    if major in (2, 3):
        return pos + arg
    if major == 4:
        for _ in range(arg):
            pos = _item_end(data, pos)
        return pos
    if major == 5:
        for _ in range(2 * arg):
            pos = _item_end(data, pos)
        return pos
    if major == 6:
        return _item_end(data, pos)
    return pos  # ints and simple values: the head is the item (floats are refused earlier)


def parse_envelope(
    data: bytes, *, max_size: int = MAX_ENVELOPE_SIZE, require_tag: bool = True
) -> RawEnvelope:
    """Check size, well-formedness and the outer shape; keep every member's received bytes."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise FormatError(ErrorCode.MALFORMED, "envelope must be bytes")
    data = bytes(data)
    if len(data) > max_size:
        raise FormatError(
            ErrorCode.TOO_LARGE, f"envelope of {len(data)} bytes exceeds the limit of {max_size}"
        )
    limits = (
        ENVELOPE_LIMITS
        if max_size == MAX_ENVELOPE_SIZE
        else cbor.Limits(max_size=max_size, max_depth=ENVELOPE_DEPTH, max_items=ENVELOPE_ITEMS)
    )
    obj = cbor.loads(data, limits)
    tagged = isinstance(obj, cbor.Tag)
    if tagged and obj.tag != suit.TAG_ENVELOPE:
        raise FormatError(ErrorCode.MALFORMED, f"not a SUIT envelope: CBOR tag {obj.tag}")
    if not tagged and require_tag:
        raise FormatError(ErrorCode.MALFORMED, "SUIT envelope must carry CBOR tag 107")
    body = obj.value if tagged else obj
    if not isinstance(body, dict):
        raise FormatError(ErrorCode.MALFORMED, "SUIT envelope must be a map")
    # Walk the raw map once to record each value's bytes, in the same order cbor2 produced.
    pos = 0
    major, _, pos = _head(data, pos)
    if major == 6:
        major, _, pos = _head(data, pos)
    members: dict[Key, Any] = {}
    spans: dict[Key, bytes] = {}
    # cbor2 builds the dict in encoded order (and the strict walk refused duplicate keys), so
    # the i-th raw entry is the i-th key.
    for key in body:
        kend = _item_end(data, pos)
        vend = _item_end(data, kend)
        if not (isinstance(key, str) or (isinstance(key, int) and not isinstance(key, bool))):
            raise FormatError(ErrorCode.MALFORMED, "SUIT envelope keys must be int or text")
        members[key] = body[key]
        spans[key] = data[kend:vend]
        pos = vend
    for key, value in members.items():
        if isinstance(key, int):
            if key not in suit.ENVELOPE_KEYS:
                raise FormatError(
                    ErrorCode.CRITICAL_UNKNOWN, f"unknown SUIT envelope element {key}"
                )
            if not isinstance(value, bytes):
                raise FormatError(
                    ErrorCode.MALFORMED, f"envelope element {key} must be a byte string"
                )
        elif not isinstance(value, bytes):
            raise FormatError(ErrorCode.MALFORMED, f"integrated payload {key!r} must be bytes")
    if suit.ENV_MANIFEST not in members:
        raise FormatError(ErrorCode.MALFORMED, "SUIT envelope has no manifest (key 3)")
    return RawEnvelope(data, tagged, members, spans)


def parse_digest(obj: Any, what: str) -> tuple[HashAlg, bytes]:
    if not isinstance(obj, list) or len(obj) != 2:
        raise FormatError(ErrorCode.MALFORMED, f"{what}: SUIT_Digest must be [alg, bytes]")
    alg = hash_alg(obj[0]) if isinstance(obj[0], int) else None
    if alg is None:
        raise FormatError(ErrorCode.MALFORMED, f"{what}: digest algorithm must be an integer")
    value = obj[1]
    if not isinstance(value, bytes) or len(value) != HASH_SIZES[alg]:
        raise FormatError(ErrorCode.MALFORMED, f"{what}: digest must be {HASH_SIZES[alg]} bytes")
    return alg, value


def parse_auth_wrapper(raw: bytes) -> AuthWrapper:
    """Split the wrapper into the SUIT_Digest and the authentication blocks (not checked yet)."""
    arr = loads_nested(raw, "authentication wrapper")
    if not isinstance(arr, list) or not arr:
        raise FormatError(ErrorCode.MALFORMED, "authentication wrapper must be a non-empty array")
    if not all(isinstance(x, bytes) for x in arr):
        raise FormatError(ErrorCode.MALFORMED, "authentication wrapper items must be byte strings")
    if len(arr) - 1 > MAX_AUTH_BLOCKS:
        raise FormatError(ErrorCode.TOO_LARGE, f"more than {MAX_AUTH_BLOCKS} authentication blocks")
    alg, digest = parse_digest(loads_nested(arr[0], "manifest digest"), "manifest digest")
    return AuthWrapper(arr[0], alg, digest, tuple(arr[1:]))
