"""Bounded, strict CBOR decoding on top of cbor2.

cbor2 is a fine general-purpose codec but it is permissive: it accepts duplicate map keys (the
last one silently wins), indefinite-length items, non-minimal heads, and nests as deep as the
input asks. Any of those lets two parsers disagree about what a signed document says, so every
signed structure in otaguard is first walked by :func:`check_well_formed`, which enforces
limits and a deterministic profile on the raw bytes, and only then handed to cbor2 to build
Python objects. The walk never allocates in proportion to a declared length: a length larger
than the remaining input is rejected before anything is read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import cbor2

from .errors import ErrorCode, FormatError


@dataclass(frozen=True)
class Limits:
    """Hard limits for one decode. Defaults suit a manifest or trust document."""

    max_size: int = 64 * 1024
    max_depth: int = 16
    max_items: int = 4096
    # Deterministic encoding (RFC 8949 §4.2.1, minus key sorting): minimal heads, definite
    # lengths only. Required for anything we sign so that re-encoding is byte-identical.
    deterministic: bool = True
    sorted_keys: bool = False  # RFC 8949 §4.2.1 core deterministic (bytewise) key order
    allow_floats: bool = False


DEFAULT_LIMITS = Limits()

# stringref (25, 256) and value sharing (28, 29): cbor2 implements them; we refuse them.
_REFERENCE_TAGS = frozenset({25, 28, 29, 256})


class _Walker:
    __slots__ = ("data", "items", "limits", "n", "tags")

    def __init__(self, data: bytes, limits: Limits) -> None:
        self.data = data
        self.n = len(data)
        self.limits = limits
        self.items = 0
        self.tags = 0

    def fail(self, code: ErrorCode, detail: str, pos: int) -> FormatError:
        return FormatError(code, f"{detail} at byte {pos}")

    def head(self, pos: int) -> tuple[int, int, int, int]:
        """Return (major, ai, argument, next_pos)."""
        if pos >= self.n:
            raise self.fail(ErrorCode.MALFORMED, "truncated CBOR (missing item head)", pos)
        ib = self.data[pos]
        major, ai = ib >> 5, ib & 0x1F
        pos += 1
        if ai < 24:
            return major, ai, ai, pos
        if ai in (24, 25, 26, 27):
            width = 1 << (ai - 24)
            if pos + width > self.n:
                raise self.fail(ErrorCode.MALFORMED, "truncated CBOR (item head)", pos)
            arg = int.from_bytes(self.data[pos : pos + width], "big")
            if self.limits.deterministic and major != 7:
                minimum = {24: 24, 25: 0x100, 26: 0x10000, 27: 0x100000000}[ai]
                if arg < minimum:
                    raise self.fail(ErrorCode.MALFORMED, "non-minimal CBOR integer/length", pos)
            return major, ai, arg, pos + width
        if ai == 31:
            raise self.fail(ErrorCode.MALFORMED, "indefinite-length CBOR item not allowed", pos)
        raise self.fail(ErrorCode.MALFORMED, f"reserved CBOR additional info {ai}", pos)

    def _flat_array(self, start: int, end: int) -> bool:
        _, _, count, pos = self.head(start)
        for _ in range(count):
            major, _, arg, pos = self.head(pos)
            if major > 3:
                return False
            if major in (2, 3):
                pos += arg
        return pos == end

    def _check_bignum(self, pos: int) -> None:
        """RFC 8949 §4.2.1/§3.4.3: an integer that fits major type 0/1 is never a bignum, and
        a bignum's bytes have no leading zero, so each integer has one encoding (a fuzz
        oracle found 2(h'0c0a1bb3cb55b44c') accepted next to its plain 64-bit spelling)."""
        major, _, length, body = self.head(pos)
        if major != 2 or length < 9 or (body < self.n and self.data[body] == 0):
            raise self.fail(ErrorCode.MALFORMED, "non-minimal CBOR bignum", pos)

    def item(self, pos: int, depth: int) -> int:
        if depth > self.limits.max_depth:
            raise self.fail(ErrorCode.TOO_LARGE, "CBOR nesting deeper than allowed", pos)
        self.items += 1
        if self.items > self.limits.max_items:
            raise self.fail(ErrorCode.TOO_LARGE, "too many CBOR items", pos)
        start = pos
        major, ai, arg, pos = self.head(pos)
        if major in (0, 1):
            return pos
        if major in (2, 3):
            if arg > self.n - pos:
                raise self.fail(ErrorCode.MALFORMED, "CBOR string longer than input", start)
            end = pos + arg
            if major == 3:
                try:
                    self.data[pos:end].decode("utf-8")
                except UnicodeDecodeError:
                    raise self.fail(
                        ErrorCode.MALFORMED, "invalid UTF-8 in text string", pos
                    ) from None
            return end
        if major == 4:
            if arg > self.n - pos:  # each element needs at least one byte
                raise self.fail(ErrorCode.MALFORMED, "CBOR array longer than input", start)
            for _ in range(arg):
                pos = self.item(pos, depth + 1)
            return pos
        if major == 5:
            if arg * 2 > self.n - pos:
                raise self.fail(ErrorCode.MALFORMED, "CBOR map longer than input", start)
            seen: set[bytes] = set()
            prev: bytes | None = None
            for _ in range(arg):
                kstart = pos
                if kstart >= self.n:
                    raise self.fail(ErrorCode.MALFORMED, "truncated CBOR (missing map key)", pos)
                kmajor = self.data[kstart] >> 5
                if kmajor > 4:
                    # Only int/bytes/text keys have exactly one (minimal) encoding, so byte-wise
                    # duplicate detection is exact; a tagged key (bignum 2(h'01') vs 1, two
                    # spellings of a datetime) could decode equal and silently override.
                    raise self.fail(
                        ErrorCode.MALFORMED, "CBOR map key must be an integer or string", kstart
                    )
                pos = self.item(pos, depth + 1)
                if kmajor == 4 and not self._flat_array(kstart, pos):
                    # Arrays of int/bytes/text are as unambiguous (SUIT_Text_Map keys its
                    # entries by component identifier, an array of bstr).
                    raise self.fail(
                        ErrorCode.MALFORMED, "CBOR array map key must hold only int/string", kstart
                    )
                key = self.data[kstart:pos]
                if key in seen:
                    raise self.fail(ErrorCode.MALFORMED, "duplicate CBOR map key", kstart)
                # The order cbor.dumps emits (RFC 8949 §4.2.1 core deterministic: bytewise
                # lexicographic order of the encoded keys), so what we sign always passes.
                if self.limits.sorted_keys and prev is not None and key <= prev:
                    raise self.fail(ErrorCode.MALFORMED, "CBOR map keys not in order", kstart)
                seen.add(key)
                prev = key
                pos = self.item(pos, depth + 1)
            return pos
        if major == 6:
            self.tags += 1
            if arg in _REFERENCE_TAGS:
                # Value sharing / string references let a few hundred bytes denote an
                # exponentially large (or cyclic) tree once expanded.
                raise self.fail(ErrorCode.UNSUPPORTED, f"CBOR tag {arg} not allowed", start)
            if arg in (2, 3) and self.limits.deterministic:
                self._check_bignum(pos)
            return self.item(pos, depth + 1)
        # major 7: simple values and floats
        if ai in (25, 26, 27):
            if not self.limits.allow_floats:
                raise self.fail(ErrorCode.MALFORMED, "floating-point value not allowed", start)
            return pos
        if ai == 24 and arg < 32:
            raise self.fail(ErrorCode.MALFORMED, "badly encoded CBOR simple value", start)
        if ai < 20 or ai == 24:
            raise self.fail(ErrorCode.MALFORMED, "unassigned CBOR simple value", start)
        return pos  # false, true, null, undefined


def check_well_formed(data: bytes, limits: Limits = DEFAULT_LIMITS) -> int:
    """Raise FormatError unless ``data`` is exactly one well-formed CBOR item within limits.

    Returns the number of tags seen (0 lets :func:`loads` skip the tuple→list thaw)."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise FormatError(ErrorCode.MALFORMED, "expected bytes")
    if len(data) > limits.max_size:
        raise FormatError(
            ErrorCode.TOO_LARGE, f"{len(data)} bytes exceeds the limit of {limits.max_size}"
        )
    if len(data) == 0:
        raise FormatError(ErrorCode.MALFORMED, "empty input")
    walker = _Walker(bytes(data), limits)
    try:
        end = walker.item(0, 0)
    except RecursionError:  # only reachable with a caller-chosen huge max_depth
        raise FormatError(ErrorCode.TOO_LARGE, "CBOR nesting too deep") from None
    if end != len(data):
        raise FormatError(ErrorCode.MALFORMED, f"trailing bytes after CBOR item at byte {end}")
    return walker.tags


def loads(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """Decode one CBOR item under ``limits``. Never raises anything but FormatError.

    Two routes, one answer. Input in the encoding otaguard itself writes (minimal heads,
    definite lengths, no floats, plain types) is decoded by cbor2 and accepted only if it
    re-encodes to the very same bytes, which proves at C speed everything the strict walk would
    check byte by byte; the few structural limits that re-encoding cannot see (depth, key
    types, value types) are checked on the decoded tree. Anything else, every rejection
    included, goes through :func:`check_well_formed`, so errors and their codes come from one
    place.
    """
    if isinstance(data, bytes | bytearray | memoryview) and 0 < len(data) <= limits.max_size:
        data = bytes(data)
        obj = _fast_loads(data, limits)
        if obj is not _MISS:
            return obj
    return strict_loads(data, limits)


def strict_loads(data: bytes, limits: Limits = DEFAULT_LIMITS) -> Any:
    """:func:`loads` without the fast route: the reference the fast route is tested against."""
    tags = check_well_formed(data, limits)
    try:
        obj = cbor2.loads(bytes(data))
        # Without tags cbor2 yields plain lists/dicts already (tuples only as map keys, which
        # _thaw leaves alone anyway), so the thaw walk is skipped on the hot path.
        return _thaw(obj) if tags else obj
    except Exception as exc:  # cbor2 raises several types; none may escape untyped
        raise FormatError(ErrorCode.MALFORMED, f"CBOR decode failed: {exc}") from None


# --- fast route ---------------------------------------------------------------------------------
_MISS: Any = object()
_U64 = 1 << 64
_KEY_SCALARS = (int, bytes, str)


class _Miss(Exception):
    """The fast route cannot vouch for this input; the strict walk decides."""


def _fast_loads(data: bytes, limits: Limits) -> Any:
    if not limits.deterministic:  # accepts encodings that re-encoding cannot reproduce
        return _MISS
    try:
        obj = cbor2.loads(data, allow_indefinite=False, allow_duplicate_keys=False)
    except Exception:
        return _MISS
    # Nodes still allowed, counted as the walk counts items; every item has a byte of its own,
    # so more nodes than bytes means value sharing (refused; and never re-encoded). Tags seen.
    budget = [min(len(data), limits.max_items), 0]
    try:
        _tree(obj, 0, limits.max_depth, budget)
        if budget[0] < 0:
            return _MISS
        again = dumps(obj) if limits.sorted_keys else cbor2.dumps(obj)
    except _Miss:
        return _MISS
    except Exception:  # cbor2 could not re-encode what it decoded: let the walk judge
        return _MISS
    if again != data:
        return _MISS
    return _thaw(obj) if budget[1] else obj


def _tree(obj: Any, depth: int, max_depth: int, budget: list[int]) -> None:
    """Check what re-encoding cannot: nesting depth, map key types, value types, sharing.

    Mirrors the strict walk: an item at depth > max_depth, a key other than int/bytes/text
    (or a flat array of those), a float, a simple value other than false/true/null/undefined,
    an integer that needs a bignum tag, or a reference tag all make this route give up."""
    budget[0] -= 1
    if budget[0] < 0:
        raise _Miss
    t = type(obj)
    if t is list or t is tuple:
        if obj:
            inner = depth + 1
            if inner > max_depth:
                raise _Miss
            for x in obj:
                tx = type(x)
                if tx is bytes or tx is str or tx is bool or x is None:
                    budget[0] -= 1
                elif tx is int:
                    budget[0] -= 1
                    if not -_U64 <= x < _U64:
                        raise _Miss
                else:
                    _tree(x, inner, max_depth, budget)
        return
    if t is dict or t is cbor2.frozendict:
        if obj:
            inner = depth + 1
            if inner > max_depth:
                raise _Miss
            for k, v in obj.items():
                _key(k, inner, max_depth, budget)
                tv = type(v)
                if tv is bytes or tv is str or tv is bool or v is None:
                    budget[0] -= 1
                elif tv is int:
                    budget[0] -= 1
                    if not -_U64 <= v < _U64:
                        raise _Miss
                else:
                    _tree(v, inner, max_depth, budget)
        return
    if t is bytes or t is str or t is bool or obj is None or obj is cbor2.undefined:
        return
    if t is int:
        if not -_U64 <= obj < _U64:
            raise _Miss
        return
    if t is cbor2.CBORTag:
        if obj.tag in _REFERENCE_TAGS or depth + 1 > max_depth:
            raise _Miss
        budget[1] += 1
        _tree(obj.value, depth + 1, max_depth, budget)
        return
    raise _Miss  # float, simple value, or an object a semantic tag decoded into


def _key(k: Any, depth: int, max_depth: int, budget: list[int]) -> None:
    budget[0] -= 1
    t = type(k)
    if t is int:
        if not -_U64 <= k < _U64:
            raise _Miss
    elif t is tuple:  # an array key: only int/bytes/text inside (see the walk)
        if k and depth + 1 > max_depth:
            raise _Miss
        for x in k:
            tx = type(x)
            if tx is not bytes and tx is not str and (tx is not int or not -_U64 <= x < _U64):
                raise _Miss
            budget[0] -= 1
    elif t is not bytes and t is not str:
        raise _Miss
    if budget[0] < 0:
        raise _Miss


def _thaw(obj: Any) -> Any:
    """cbor2 decodes everything under a tag as tuples/frozendicts; give callers one shape.

    Map keys stay as decoded (they must remain hashable)."""
    if isinstance(obj, list | tuple):
        return [_thaw(x) for x in obj]
    if isinstance(obj, dict | cbor2.frozendict):
        return {k: _thaw(v) for k, v in obj.items()}
    if isinstance(obj, cbor2.CBORTag):
        return cbor2.CBORTag(obj.tag, _thaw(obj.value))
    return obj


def dumps(obj: Any) -> bytes:
    """RFC 8949 §4.2.1 core deterministic encoding, so re-encoding a decoded document is stable.

    Map keys are sorted bytewise by their encoding (core deterministic order), not length-first
    as cbor2's ``canonical`` (RFC 7049 §3.9) does: the two differ when a map mixes key types,
    e.g. 24 (0x1818) sorts before -1 (0x20) here. cbor2 keeps a dict's insertion order when
    not canonical, so the maps are put in order first; heads are minimal either way."""
    return cbor2.dumps(_core_order(obj))


def core_key(key: Any) -> bytes:
    """A map key's encoding: what core deterministic order sorts by."""
    return cbor2.dumps(key, canonical=True)


def _core_order(obj: Any) -> Any:
    if isinstance(obj, dict | cbor2.frozendict):  # frozendict: what cbor2 decodes under a tag
        items = sorted(((core_key(k), k, v) for k, v in obj.items()), key=lambda t: t[0])
        return {k: _core_order(v) for _, k, v in items}
    if isinstance(obj, list | tuple):
        return [_core_order(x) for x in obj]
    if isinstance(obj, cbor2.CBORTag):
        return cbor2.CBORTag(obj.tag, _core_order(obj.value))
    return obj


Tag = cbor2.CBORTag


def expect_tag(obj: Any, tag: int, what: str, *, required: bool = True) -> Any:
    """Unwrap CBOR tag ``tag`` (e.g. 18 for COSE_Sign1, 107 for SUIT_Envelope)."""
    if isinstance(obj, cbor2.CBORTag):
        if obj.tag != tag:
            raise FormatError(ErrorCode.MALFORMED, f"{what}: unexpected CBOR tag {obj.tag}")
        return obj.value
    if required:
        raise FormatError(ErrorCode.MALFORMED, f"{what}: missing CBOR tag {tag}")
    return obj
