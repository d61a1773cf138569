"""Firmware version strings ("X.Y.Z") and their ordering.

Versions are dotted non-negative integers, compared numerically component by component with
missing trailing components treated as 0 ("1.2" == "1.2.0"). Pre-release tags are refused:
rollback protection needs a total order that every device computes identically.
"""

from __future__ import annotations

import re

from ..errors import ErrorCode, FormatError

MAX_COMPONENTS = 8
MAX_COMPONENT = 2**32 - 1
_RE = re.compile(r"^(0|[1-9][0-9]{0,9})(\.(0|[1-9][0-9]{0,9})){0,7}$")


def parse_version(text: str) -> tuple[int, ...]:
    """Parse "1.2.3" into (1, 2, 3); raise E_MALFORMED for anything else."""
    if not isinstance(text, str) or not _RE.match(text):
        raise FormatError(ErrorCode.MALFORMED, f"invalid version {text!r} (want e.g. '1.2.3')")
    parts = tuple(map(int, text.split(".")))
    if len(parts) > MAX_COMPONENTS or max(parts) > MAX_COMPONENT:
        raise FormatError(ErrorCode.MALFORMED, f"version {text!r} out of range")
    return parts


def _norm(v: str | tuple[int, ...]) -> tuple[int, ...]:
    parts = parse_version(v) if isinstance(v, str) else tuple(v)
    while len(parts) > 1 and parts[-1] == 0:
        parts = parts[:-1]
    return parts


def compare_versions(a: str | tuple[int, ...], b: str | tuple[int, ...]) -> int:
    """-1, 0 or 1 as a <, ==, > b."""
    na, nb = _norm(a), _norm(b)
    return (na > nb) - (na < nb)


def version_lt(a: str, b: str) -> bool:
    return compare_versions(a, b) < 0


def version_le(a: str, b: str) -> bool:
    return compare_versions(a, b) <= 0


def version_ge(a: str, b: str) -> bool:
    return compare_versions(a, b) >= 0


def version_gt(a: str, b: str) -> bool:
    return compare_versions(a, b) > 0


def format_version(parts: tuple[int, ...] | list[int]) -> str:
    if not parts or not all(type(p) is int and p >= 0 for p in parts):
        raise FormatError(ErrorCode.MALFORMED, f"invalid version components {parts!r}")
    return ".".join(map(str, parts))
