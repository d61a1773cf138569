"""Vendor and class identifiers as SUIT wants them: RFC 9562 UUID v5 names.

A device stores its own (vendor-id, class-id) pair at manufacturing; a manifest names the pair
it is for. Deriving both from stable names (vendor DNS domain, "model:hw_rev") means the
release pipeline and the factory compute the same 16 bytes without a shared registry.
"""

from __future__ import annotations

import uuid

from ..errors import ErrorCode, FormatError


def vendor_id(domain: str) -> uuid.UUID:
    """SUIT vendor identifier: UUID5(NAMESPACE_DNS, domain), domain lower-cased (DNS is not
    case-sensitive, so 'ACME.example' and 'acme.example' must name the same vendor)."""
    if not isinstance(domain, str) or not domain.strip():
        raise FormatError(ErrorCode.USAGE, "vendor domain must be a non-empty string")
    return uuid.uuid5(uuid.NAMESPACE_DNS, domain.strip().lower())


def class_id(vendor: uuid.UUID, model: str, hw_rev: str) -> uuid.UUID:
    """SUIT class identifier: UUID5 in the vendor's namespace of ``"model:hw_rev"``."""
    if not model or not hw_rev:
        raise FormatError(ErrorCode.USAGE, "model and hw_rev must be non-empty")
    if ":" in model:
        raise FormatError(ErrorCode.USAGE, "model must not contain ':' (ambiguous class name)")
    return uuid.uuid5(vendor, f"{model}:{hw_rev}")


def uuid_from_bytes(data: object, what: str) -> uuid.UUID:
    """Parse a 16-byte SUIT identifier (bstr) into a UUID."""
    if not isinstance(data, bytes) or len(data) != 16:
        raise FormatError(ErrorCode.MALFORMED, f"{what} must be a 16-byte UUID")
    return uuid.UUID(bytes=data)
