"""What arrives over HTTP, parsed once and strictly: JSON bodies and decimal numbers.

Why one module: each listener (device API, admin API, signing service) used to call
``json.loads`` and ``str.isdigit`` itself, and each let through something that failed later as
an HTTP 500: nesting deep enough for a RecursionError, integers no database column holds, lone
UTF-16 surrogates that are stored and then break every listing that shows them, and digits
that ``isdigit`` accepts but ``int`` does not (``"²"``). Here every such input is refused at
the door with E_MALFORMED, so nothing stored can later fail to encode.
"""

from __future__ import annotations

import json
from typing import Any

from .errors import ErrorCode, FormatError

MAX_DEPTH = 32
INT_LIMIT = 2**63  # what a signed 64-bit column holds


def _bounded_int(text: str) -> int:
    if len(text) > 20:
        raise ValueError("integer too long")
    n = int(text)
    if not -INT_LIMIT <= n < INT_LIMIT:
        raise ValueError("integer outside 64 bits")
    return n


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _check(obj: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise FormatError(ErrorCode.MALFORMED, f"JSON nested deeper than {MAX_DEPTH}")
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            raise FormatError(
                ErrorCode.MALFORMED, "string is not valid Unicode (lone surrogate)"
            ) from None
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check(k, depth + 1)
            _check(v, depth + 1)
    elif isinstance(obj, list):
        for v in obj:
            _check(v, depth + 1)


def loads_json(data: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, 64-bit integers, depth <= MAX_DEPTH, every string
    encodable as UTF-8. Anything else is E_MALFORMED."""
    try:
        text = data.decode("utf-8")
        obj = json.loads(text, parse_int=_bounded_int, parse_constant=_no_constant)
    except (ValueError, RecursionError):  # UnicodeDecodeError and JSONDecodeError included
        raise FormatError(ErrorCode.MALFORMED, "body is not strict JSON") from None
    _check(obj, 0)
    return obj


def decimal(text: str | None) -> int | None:
    """An unsigned ASCII decimal (``str.isdigit`` also accepts other scripts' digits and
    superscripts, some of which ``int`` refuses), at most 19 digits; None otherwise."""
    if not text or len(text) > 19 or not text.isascii() or not text.isdigit():
        return None
    return int(text)
