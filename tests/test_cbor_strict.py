"""otaguard.cbor: the strict, bounded profile every signed document goes through."""

from __future__ import annotations

import tracemalloc
from typing import Any

import cbor2
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otaguard import cbor
from otaguard.errors import ErrorCode, FormatError
from tests.steps import StepBudgetExceeded, run_counted


def _code(data: bytes, limits: cbor.Limits = cbor.DEFAULT_LIMITS) -> ErrorCode:
    with pytest.raises(FormatError) as e:
        cbor.loads(data, limits)
    return e.value.code


@pytest.mark.parametrize(
    ("hexdata", "code"),
    [
        ("a20101 0102", ErrorCode.MALFORMED),  # {1: 1, 1: 2}
        ("a2616101 616102", ErrorCode.MALFORMED),  # {"a": 1, "a": 2}
        ("a1a1010101", ErrorCode.MALFORMED),  # map as a map key
        ("a1818101 01", ErrorCode.MALFORMED),  # array holding an array as a map key
        ("a1f6 01", ErrorCode.MALFORMED),  # null as a map key
        ("a2 01 6161 c2 41 01 6162", ErrorCode.MALFORMED),  # {1: .., bignum 1: ..}
        ("9f0102ff", ErrorCode.MALFORMED),  # indefinite array
        ("5f4101ff", ErrorCode.MALFORMED),  # indefinite bytes
        ("bf0101ff", ErrorCode.MALFORMED),  # indefinite map
        ("1817", ErrorCode.MALFORMED),  # 23 in two bytes
        ("190017", ErrorCode.MALFORMED),  # 23 in three bytes
        ("1a000000ff", ErrorCode.MALFORMED),  # 255 in five bytes
        ("1b00000000ffffffff", ErrorCode.MALFORMED),
        ("3817", ErrorCode.MALFORMED),  # -24 non-minimal
        ("5801 00", ErrorCode.MALFORMED),  # bytes length non-minimal
        ("9801 00", ErrorCode.MALFORMED),  # array length non-minimal
        ("0102", ErrorCode.MALFORMED),  # trailing bytes
        ("", ErrorCode.MALFORMED),  # empty
        ("19 01", ErrorCode.MALFORMED),  # truncated head
        ("43 0102", ErrorCode.MALFORMED),  # truncated bytes
        ("83 0102", ErrorCode.MALFORMED),  # truncated array
        ("a2 0102 03", ErrorCode.MALFORMED),  # truncated map
        ("62 c328", ErrorCode.MALFORMED),  # invalid UTF-8
        ("63 eda080", ErrorCode.MALFORMED),  # UTF-8-encoded surrogate
        ("f93c00", ErrorCode.MALFORMED),  # half float 1.0
        ("fa3f800000", ErrorCode.MALFORMED),  # single float
        ("fb3ff0000000000000", ErrorCode.MALFORMED),  # double
        ("f0", ErrorCode.MALFORMED),  # unassigned simple value
        ("f818", ErrorCode.MALFORMED),  # simple value in two bytes below 32
        ("1c", ErrorCode.MALFORMED),  # reserved additional info
        ("ff", ErrorCode.MALFORMED),  # lone break
        ("d8 1c 81 d8 1d 00", ErrorCode.UNSUPPORTED),  # value sharing (cyclic)
        ("d9 0100 82 63 616263 d8 19 00", ErrorCode.UNSUPPORTED),  # string references
    ],
)
def test_rejected(hexdata: str, code: ErrorCode) -> None:
    assert _code(bytes.fromhex(hexdata.replace(" ", ""))) == code


def test_accepted_basics() -> None:
    assert cbor.loads(bytes.fromhex("a201020304")) == {1: 2, 3: 4}
    assert cbor.loads(bytes.fromhex("f5")) is True
    assert cbor.loads(bytes.fromhex("f6")) is None
    assert cbor.loads(bytes.fromhex("fa3f800000"), cbor.Limits(allow_floats=True)) == 1.0
    # tagged content comes back as lists/dicts, not cbor2's tuples/frozendicts
    tagged = cbor.loads(cbor.dumps(cbor.Tag(18, [b"", {1: [2]}, None, b"s"])))
    assert isinstance(tagged, cbor.Tag)
    assert tagged.value == [b"", {1: [2]}, None, b"s"]
    assert isinstance(tagged.value, list) and isinstance(tagged.value[1], dict)
    # flat arrays of int/bytes/text are allowed as keys (SUIT_Text_Map component ids)
    assert cbor.loads(bytes.fromhex("a1814100 01")) == {(b"\x00",): 1}
    # key order is not enforced unless asked for
    assert cbor.loads(bytes.fromhex("a203040102")) == {3: 4, 1: 2}
    assert _code(bytes.fromhex("a203040102"), cbor.Limits(sorted_keys=True)) == ErrorCode.MALFORMED
    # non-deterministic input is accepted only when the caller opts out of the profile
    assert cbor.loads(bytes.fromhex("1817"), cbor.Limits(deterministic=False)) == 23


def test_depth_and_count_limits() -> None:
    deep = b"\x81" * 17 + b"\x00"
    assert _code(deep) == ErrorCode.TOO_LARGE
    assert cbor.loads(b"\x81" * 16 + b"\x00") is not None
    deep_tags = b"\xd8\x20" * 40 + b"\x00"
    assert _code(deep_tags) == ErrorCode.TOO_LARGE
    many = b"\x99\x10\x00" + b"\x00" * 4096  # array of 4096 zeros: 4097 items
    assert _code(many) == ErrorCode.TOO_LARGE
    assert _code(b"\x00" * 10, cbor.Limits(max_size=5)) == ErrorCode.TOO_LARGE
    # a caller-chosen huge depth must still end in FormatError, not RecursionError
    very_deep = b"\x81" * 100_000 + b"\x00"
    limits = cbor.Limits(max_size=200_000, max_depth=10**9, max_items=10**9)
    assert _code(very_deep, limits) == ErrorCode.TOO_LARGE


@pytest.mark.parametrize(
    "head",
    [
        b"\x5b\x00\x00\x00\x7f\xff\xff\xff\xff",  # bytes of 2^39
        b"\x7b\x7f\xff\xff\xff\xff\xff\xff\xff",  # text of 2^63
        b"\x9b\x00\x00\x00\x01\x00\x00\x00\x00",  # array of 2^32
        b"\xbb\x00\x00\x01\x00\x00\x00\x00\x00",  # map of 2^40
        b"\x5a\x00\x10\x00\x00",  # bytes of 1 MiB
    ],
)
def test_huge_declared_lengths_allocate_nothing(head: bytes) -> None:
    """No memory and no work proportional to the declared length: the refusal comes from
    comparing the length with what is left of the input (a few dozen interpreter steps; a
    loop over the declared length would need billions and is stopped at the budget)."""
    tracemalloc.start()
    try:
        err, steps = run_counted(lambda: cbor.loads(head + b"\x00" * 16), budget=2_000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert isinstance(err, FormatError) and err.code == ErrorCode.MALFORMED
    assert peak < 256 * 1024
    assert steps < 2_000


def _shared_bomb(levels: int, fanout: int) -> bytes:
    """A few hundred bytes that expand to fanout**levels nodes if references are followed."""

    def arr(items: list[bytes]) -> bytes:
        return cbor2.dumps([0] * len(items))[: -len(items)] + b"".join(items)

    node = b"\xd8\x1c" + arr([b"\x00"])
    for k in range(1, levels + 1):
        ref = b"\xd8\x1d" + cbor2.dumps(levels - (k - 1))
        node = b"\xd8\x1c" + arr([node] + [ref] * fanout)
    return node


def test_shared_value_bomb_rejected_fast() -> None:
    """Work bounded by the input's size, not by what it would expand to (20**7 nodes):
    under 50 steps per input byte (a parser that followed the references would be stopped
    at the budget, long before it finished)."""
    data = _shared_bomb(7, 20)
    assert len(data) < 1024
    err, steps = run_counted(lambda: cbor.loads(data, cbor.Limits(max_depth=64)), budget=50_000)
    assert isinstance(err, FormatError) and err.code == ErrorCode.UNSUPPORTED
    assert steps < 50 * len(data)


def test_step_budget_stops_work_proportional_to_a_declared_length() -> None:
    """The yardstick itself: a loop over a declared 2**32 items is stopped at the budget."""

    def naive(n: int) -> int:
        total = 0
        for _ in range(n):
            total += 1
        return total

    assert run_counted(lambda: naive(100), budget=2_000)[0] == 100
    with pytest.raises(StepBudgetExceeded):
        run_counted(lambda: naive(1 << 32), budget=2_000)


# --- properties --------------------------------------------------------------------------------

_keys = st.integers(min_value=-(2**64), max_value=2**64 - 1) | st.text(max_size=8)
_scalars = (
    st.integers(min_value=-(2**64), max_value=2**64 - 1)
    | st.binary(max_size=32)
    | st.text(max_size=32)
    | st.booleans()
    | st.none()
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(_keys, inner, max_size=5),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(_values)
def test_round_trip(value: Any) -> None:
    encoded = cbor.dumps(value)
    assert cbor.loads(encoded) == value
    assert cbor.dumps(cbor.loads(encoded)) == encoded  # deterministic: stable re-encoding


@settings(max_examples=200, deadline=None)
@given(_values)
def test_canonical_dumps_pass_sorted_profile(value: Any) -> None:
    cbor.check_well_formed(cbor.dumps(value), cbor.Limits(sorted_keys=True))


def test_sorted_profile_refuses_out_of_order_keys() -> None:
    # {24: 0, "": 0} in core deterministic order (RFC 8949 §4.2.1, bytewise) puts 24 (0x1818)
    # before "" (0x60), where length-first (RFC 7049) order would put the 1-byte key first.
    good = bytes.fromhex("a21818006000")
    bad = bytes.fromhex("a26000181800")
    cbor.check_well_formed(good, cbor.Limits(sorted_keys=True))
    with pytest.raises(FormatError) as e:
        cbor.check_well_formed(bad, cbor.Limits(sorted_keys=True))
    assert e.value.code == ErrorCode.MALFORMED
    # under a tag too (cbor2 decodes it as a frozendict), on the fast route as on the walk
    for blob in (bad, bytes.fromhex("d2") + bad, bytes.fromhex("81d2") + bad):
        with pytest.raises(FormatError) as e:
            cbor.loads(blob, cbor.Limits(sorted_keys=True))
        assert e.value.code == ErrorCode.MALFORMED
    assert cbor.loads(bytes.fromhex("d2") + good, cbor.Limits(sorted_keys=True)).tag == 18


_PLAIN = (int, bytes, str, bool, type(None), list, dict, cbor2.CBORTag, cbor2.CBORSimpleValue)


def _plain(value: Any) -> bool:
    """Only the data model otaguard signs (no datetime, Decimal, regex... from a semantic tag:
    every format's own type checks refuse those)."""
    if isinstance(value, cbor2.CBORTag):
        return _plain(value.value)
    if isinstance(value, list | tuple):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_plain(k) and _plain(v) for k, v in value.items())
    return isinstance(value, _PLAIN) or value is cbor2.undefined


def assert_only_its_own_encoding(blob: bytes, limits: cbor.Limits = cbor.DEFAULT_LIMITS) -> Any:
    """The oracle: whatever the strict decoder accepts is *the* deterministic encoding of the
    value it returns (re-encoding gives back the same bytes), so a mutation that makes it
    accept a second spelling of a value (a non-minimal head, a bignum that fits 64 bits, a
    duplicate key, an unsorted map under ``sorted_keys``) fails here. None if refused."""
    try:
        value = cbor.loads(blob, limits)
    except FormatError:
        return None
    if _plain(value) and not limits.allow_floats:
        assert cbor2.dumps(value, canonical=limits.sorted_keys) == blob, (blob.hex(), value)
    return value


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=64))
def test_random_bytes_only_raise_format_error(data: bytes) -> None:
    assert_only_its_own_encoding(data)


@settings(max_examples=500, deadline=None)
@given(_values, st.data())
def test_mutated_encodings_only_raise_format_error(value: Any, data: Any) -> None:
    encoded = bytearray(cbor.dumps(value))
    i = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    encoded[i] = data.draw(st.integers(min_value=0, max_value=255))
    assert_only_its_own_encoding(bytes(encoded), cbor.Limits(max_depth=64))


# --- the fast route (decode, check the tree, re-encode, compare) agrees with the strict walk --
_wide_scalars = (
    st.integers(min_value=-(2**70), max_value=2**70)  # bignums need tags 2/3
    | st.binary(max_size=8)
    | st.text(max_size=8)
    | st.booleans()
    | st.none()
    | st.floats(allow_nan=False, width=32)
    | st.just(cbor2.undefined)
    | st.builds(cbor2.CBORSimpleValue, st.sampled_from([0, 16, 19, 32, 255]))
)
_wide_keys = _wide_scalars.filter(lambda k: not isinstance(k, cbor2.CBORSimpleValue)) | st.tuples(
    st.integers(0, 30), st.text(max_size=3)
)


def _tagged(inner: Any) -> Any:
    return st.builds(
        cbor2.CBORTag, st.sampled_from([0, 2, 18, 24, 25, 28, 29, 107, 256, 1000]), inner
    )


_wide_values = st.recursive(
    _wide_scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(_wide_keys, inner, max_size=4)
        | _tagged(inner)
    ),
    max_leaves=20,
)
_LIMITS = [
    cbor.DEFAULT_LIMITS,
    cbor.Limits(sorted_keys=True),
    cbor.Limits(max_depth=2),
    cbor.Limits(max_items=6),
    cbor.Limits(allow_floats=True),
]


def _answer(fn: Any, data: bytes, limits: cbor.Limits) -> Any:
    try:
        return ("ok", fn(data, limits))
    except FormatError as err:
        return ("error", err.code)


@settings(max_examples=600, deadline=None)
@given(_wide_values, st.booleans(), st.sampled_from(_LIMITS), st.data())
def test_fast_route_agrees_with_strict_walk(
    value: Any, canonical: bool, limits: cbor.Limits, data: Any
) -> None:
    try:
        encoded = bytearray(cbor2.dumps(value, canonical=canonical))
    except Exception:  # a value cbor2 itself cannot encode (e.g. a tagged cycle): not our case
        return
    if data.draw(st.booleans()) and encoded:
        i = data.draw(st.integers(0, len(encoded) - 1))
        encoded[i] = data.draw(st.integers(0, 255))
    blob = bytes(encoded)
    assert _answer(cbor.loads, blob, limits) == _answer(cbor.strict_loads, blob, limits)
    assert_only_its_own_encoding(blob, limits)


@pytest.mark.parametrize(
    "hexdata",
    [
        "c2480c0a1bb3cb55b44c",  # 2(h'0c0a1bb3cb55b44c'): fits 64 bits, so it must be 1b...
        "c240",  # 2(h''): zero as a bignum
        "c349000000000000000001",  # a bignum with a leading zero byte
    ],
)
def test_bignum_spelling_of_a_small_integer_is_refused(hexdata: str) -> None:
    """Found by the oracle above: one integer, one encoding."""
    assert _code(bytes.fromhex(hexdata)) == ErrorCode.MALFORMED
    assert cbor.loads(bytes.fromhex("c249010000000000000000")) == 2**64  # a real bignum is fine


@pytest.mark.parametrize(
    "hexdata",
    [
        "d81c81d81d00",  # shared value referring to itself: a cycle
        "d8198100",  # stringref outside a namespace
        "d9010082616161d81900",  # stringref namespace
        "c249010000000000000000",  # bignum 2**64 (tag 2)
        "d9001200",  # tag 18 with a non-minimal tag number
        "f4",
        "fb3ff0000000000000",
    ],
)
def test_fast_route_agrees_on_edge_cases(hexdata: str) -> None:
    blob = bytes.fromhex(hexdata)
    for limits in _LIMITS:
        assert _answer(cbor.loads, blob, limits) == _answer(cbor.strict_loads, blob, limits)


def test_fast_route_is_taken_for_canonical_documents() -> None:
    doc = cbor.dumps(cbor.Tag(18, [b"\xa1\x01\x27", {4: b"kid"}, None, b"s" * 64]))
    assert cbor._fast_loads(doc, cbor.DEFAULT_LIMITS) is not cbor._MISS
    assert cbor._fast_loads(doc, cbor.Limits(sorted_keys=True)) is not cbor._MISS
    nested = b"\x81" * 3 + b"\x00"
    assert cbor._fast_loads(nested, cbor.Limits(max_depth=3)) is not cbor._MISS
    assert cbor._fast_loads(nested, cbor.Limits(max_depth=2)) is cbor._MISS
