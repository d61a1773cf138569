"""otaguard.cborread: in-place readers that accept only the shortest, definite encoding.

The canonical route's safety rests on one property, checked here for every reader: whatever
bytes a reader accepts are exactly what the fragment encoder (otaguard.cborenc) writes for the
value read. Everything else (a longer head, an indefinite length, a string running past the
end, another major type) is a Mismatch or a read past the end, never a value.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otaguard import cborenc as enc
from otaguard import cborread as rd

U64 = st.integers(0, 2**64 - 1)
DOUBT = (ValueError, IndexError)


@settings(max_examples=300, deadline=None)
@given(U64, st.binary(max_size=4))
def test_uint_reads_back_what_the_encoder_writes(n: int, tail: bytes) -> None:
    data = enc.uint(n) + tail
    assert rd.uint(data, 0) == (n, len(data) - len(tail))


@settings(max_examples=300, deadline=None)
@given(st.integers(-(2**64), 2**64 - 1))
def test_integer_reads_back_both_signs(n: int) -> None:
    data = enc.integer(n)
    assert rd.integer(data, 0) == (n, len(data))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.binary(max_size=3))
def test_bstr_span_is_the_content(value: bytes, tail: bytes) -> None:
    data = b"\x00" + enc.bstr(value) + tail
    start, end = rd.bstr(data, 1)
    assert data[start:end] == value
    assert end == len(data) - len(tail)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=300))
def test_tstr_reads_back(value: str) -> None:
    data = enc.tstr(value)
    assert rd.tstr(data, 0) == (value, len(data))


@settings(max_examples=1000, deadline=None)
@given(st.binary(min_size=1, max_size=12), st.sampled_from(["uint", "integer", "bstr", "tstr"]))
def test_anything_accepted_is_the_one_encoding(data: bytes, kind: str) -> None:
    """Random bytes: a reader either refuses them or they begin with the canonical encoding of
    the value it returned (so no second encoding of any value gets through)."""
    try:
        if kind == "uint":
            n, end = rd.uint(data, 0)
            assert data[:end] == enc.uint(n)
        elif kind == "integer":
            n, end = rd.integer(data, 0)
            assert data[:end] == enc.integer(n)
        elif kind == "bstr":
            start, end = rd.bstr(data, 0)
            assert data[:end] == enc.bstr(data[start:end])
        else:
            s, end = rd.tstr(data, 0)
            assert data[:end] == enc.tstr(s)
    except DOUBT:
        pass


@pytest.mark.parametrize(
    "data",
    [
        b"\x18\x17",  # 23 in a one-byte argument
        b"\x19\x00\xff",  # 255 in two bytes
        b"\x1a\x00\x00\xff\xff",  # 65535 in four bytes
        b"\x1b\x00\x00\x00\x00\xff\xff\xff\xff",  # 2**32-1 in eight bytes
    ],
)
def test_non_minimal_heads_are_refused(data: bytes) -> None:
    with pytest.raises(rd.Mismatch, match="non-minimal"):
        rd.uint(data, 0)


@pytest.mark.parametrize(
    ("reader", "data"),
    [
        (rd.uint, b"\x1c"),  # reserved additional information
        (rd.uint, b"\x1f"),  # "indefinite" for an integer
        (rd.bstr, b"\x5f\x41\x00\xff"),  # indefinite-length (chunked) byte string
        (rd.tstr, b"\x7f\x61a\xff"),  # indefinite-length text string
        (rd.bstr, b"\x58\x10" + bytes(16)),  # 16 in a one-byte argument
        (rd.bstr, b"\x59\x00\x20" + bytes(32)),  # 32 in a two-byte argument
        (rd.tstr, b"\x78\x03abc"),
    ],
)
def test_indefinite_reserved_and_long_string_heads_are_refused(reader: object, data: bytes) -> None:
    with pytest.raises(rd.Mismatch):
        reader(data, 0)  # type: ignore[operator]


@pytest.mark.parametrize(
    ("reader", "data"),
    [
        (rd.bstr, b"\x45abcd"),  # five announced, four there
        (rd.bstr, b"\x58\x20" + bytes(31)),
        (rd.tstr, b"\x63ab"),
        (rd.uint, b"\x19\x01"),  # two-byte argument cut short
        (rd.uint, b"\x1b\x00\x00\x01"),
        (rd.uint, b""),
    ],
)
def test_truncated_input_is_never_a_value(reader: object, data: bytes) -> None:
    with pytest.raises(DOUBT):
        reader(data, 0)  # type: ignore[operator]


def test_wrong_major_type_and_bad_utf8() -> None:
    with pytest.raises(rd.Mismatch, match="major type"):
        rd.bstr(enc.tstr("abc"), 0)
    with pytest.raises(rd.Mismatch, match="major type"):
        rd.uint(enc.integer(-1), 0)
    with pytest.raises(rd.Mismatch, match="major type"):
        rd.integer(b"\xf5", 0)  # true is not an integer
    with pytest.raises(UnicodeDecodeError):
        rd.tstr(b"\x62\xc3\x28", 0)


def test_expect_and_at_end() -> None:
    assert rd.expect(b"\x01\x02\x03", 1, b"\x02\x03") == 3
    with pytest.raises(rd.Mismatch):
        rd.expect(b"\x01\x02\x03", 1, b"\x02\x04")
    with pytest.raises(rd.Mismatch):
        rd.expect(b"\x01\x02", 1, b"\x02\x03")  # past the end
    rd.at_end(5, 5)
    with pytest.raises(rd.Mismatch):
        rd.at_end(6, 5)
