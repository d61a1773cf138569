"""Does a verified manifest apply to this device? Checked before any image byte is fetched.

Only called on a :class:`~otaguard.manifest.verify.VerifiedManifest`'s info: the checks here
are about applicability and rollback, not authenticity.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from ..errors import ErrorCode, ManifestConditionError
from .model import ManifestInfo
from .version import compare_versions

MAX_SECURITY_COUNTER = 2**32 - 1  # a counter at or past 2^32 is absurd: E_FAST_FORWARD
MAX_SEQUENCE = 2**40 - 1  # sequence numbers are POSIX seconds; 2^40 s is ~35,000 years


@dataclass(frozen=True)
class DeviceFacts:
    vendor_id: uuid.UUID
    class_id: uuid.UUID
    running_version: str
    security_counter: int  # the device's monotonic counter (never decreases)
    last_sequence: int  # highest manifest sequence number the device has accepted
    now: int | None  # trusted-ish time (latest known time); None = no clock


def check_fleet_wide(info: ManifestInfo, now: int | None) -> None:
    """The conditions every device refuses whatever its state: absurd counters (fast-forward)
    and expiry. The update server applies the same function to an upload, so it never
    accepts a release no device could install."""
    if info.security_counter > MAX_SECURITY_COUNTER or info.sequence_number > MAX_SEQUENCE:
        # burning such a value into the monotonic counters would lock the device out of every
        # later release (fast-forward attack with a stolen signing credential)
        raise ManifestConditionError(
            ErrorCode.FAST_FORWARD,
            f"security counter {info.security_counter} / sequence {info.sequence_number} "
            f"beyond the sane bound ({MAX_SECURITY_COUNTER} / {MAX_SEQUENCE})",
        )
    if info.expires is not None and now is not None and now > info.expires:
        raise ManifestConditionError(
            ErrorCode.EXPIRED, f"manifest expired at {info.expires} (now {now})"
        )


def check_applicable(info: ManifestInfo, facts: DeviceFacts) -> None:
    """Raise ManifestConditionError with the first failing condition's code.

    Order mirrors the SUIT shared sequence: identity (vendor, class) first, then the
    update-management conditions (expiry, version), then our rollback protections.
    """
    if info.vendor_id != facts.vendor_id:
        raise ManifestConditionError(
            ErrorCode.VENDOR_ID,
            f"manifest is for vendor {info.vendor_id}, device is {facts.vendor_id}",
        )
    if info.class_id != facts.class_id:
        raise ManifestConditionError(
            ErrorCode.CLASS_ID, f"manifest is for class {info.class_id}, device is {facts.class_id}"
        )
    check_fleet_wide(info, facts.now)
    if (
        info.min_version is not None
        and compare_versions(facts.running_version, info.min_version) < 0
    ):
        raise ManifestConditionError(
            ErrorCode.MIN_VERSION,
            f"running version {facts.running_version} is below the required {info.min_version}",
        )
    if info.security_counter < facts.security_counter:
        raise ManifestConditionError(
            ErrorCode.SECURITY_COUNTER,
            f"security counter {info.security_counter} is below the device's "
            f"{facts.security_counter} (rollback)",
        )
    if info.sequence_number <= facts.last_sequence:
        raise ManifestConditionError(
            ErrorCode.REPLAY,
            f"sequence number {info.sequence_number} is not above the last accepted "
            f"{facts.last_sequence}",
        )
