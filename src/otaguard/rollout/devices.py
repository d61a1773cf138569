"""Per-device progress inside a campaign, driven by (at-least-once, possibly reordered) reports.

A device's progress only moves forward. Its position is the key (attempt version, state rank):
a report is applied only if it raises that key, so a duplicate report changes nothing and a late
"downloading" after "succeeded" is ignored. A migration step (an intermediate release offered
because the target's min_version is above the device's version) that succeeds leaves the device
OFFERED for the next step with ``step_done`` set, which ranks it above every older report about
that step. Finished states (succeeded, failed, reverted) are final for the campaign.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ..errors import ErrorCode, FormatError
from ..manifest.version import compare_versions, parse_version
from .model import DeviceState, version_key

MAX_ERROR = 64


class DeviceEvent(StrEnum):
    """What a status report (or the server's own offer) says happened."""

    OFFERED = "offered"  # server-generated when it hands the device a manifest reference
    DOWNLOADING = "downloading"
    INSTALLED = "installed"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    REVERTED = "reverted"

    @property
    def state(self) -> DeviceState:
        return DeviceState(self.value)


@dataclass(frozen=True, slots=True)
class DeviceProgress:
    """One device's row in one campaign (the server stores ``to_dict()`` or the fields)."""

    state: DeviceState = DeviceState.PENDING
    version: str | None = None  # release version of the current attempt (step or target)
    step_done: bool = False  # the intermediate ``version`` is confirmed; next step is due
    steps: int = 0  # migration steps completed
    error: str | None = None  # error code of a failure/revert

    @property
    def _key(self) -> tuple[tuple[int, ...], int]:
        v = _vkey(self.version)
        return (v, 4 if self.step_done else self.state.order)

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "version": self.version,
            "step_done": self.step_done,
            "steps": self.steps,
            "error": self.error,
        }

    @classmethod
    def from_dict(cls, d: object) -> DeviceProgress:
        if not isinstance(d, dict):
            raise FormatError(ErrorCode.MALFORMED, "device progress must be an object")
        try:
            state = DeviceState(d.get("state", "pending"))
        except ValueError:
            raise FormatError(ErrorCode.MALFORMED, "unknown device state") from None
        version = d.get("version")
        if version is not None:
            parse_version(version)
        steps = d.get("steps", 0)
        step_done = d.get("step_done", False)
        error = d.get("error")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 0:
            raise FormatError(ErrorCode.MALFORMED, "device progress steps must be an int ≥ 0")
        if not isinstance(step_done, bool):
            raise FormatError(ErrorCode.MALFORMED, "device progress step_done must be a bool")
        return cls(state, version, step_done, steps, _error(error))


def _vkey(version: str | None) -> tuple[int, ...]:
    return () if version is None else version_key(version)


def _error(error: object) -> str | None:
    if error is None:
        return None
    if not isinstance(error, str) or not error or len(error) > MAX_ERROR:
        raise FormatError(ErrorCode.MALFORMED, f"error code must be a string ≤ {MAX_ERROR} chars")
    return error


def apply_report(
    progress: DeviceProgress,
    event: DeviceEvent,
    *,
    target_version: str,
    version: str | None = None,
    error: str | None = None,
) -> DeviceProgress:
    """The device's progress after ``event`` about the release ``version`` (None: the attempt
    in progress). Returns ``progress`` itself (``is``) when the report changes nothing.

    Reports from a device that was never offered anything (PENDING) are ignored except the
    server's own OFFERED: a device cannot legitimately progress in a campaign that has not
    admitted it, and counting it would break the phase quota.
    """
    event = DeviceEvent(event)
    if progress.state.finished:
        return progress
    if progress.state is DeviceState.PENDING and event is not DeviceEvent.OFFERED:
        return progress
    ev_version = version if version is not None else (progress.version or target_version)
    new_key = (_vkey(ev_version), event.state.order)
    if new_key <= progress._key:
        return progress
    if event is DeviceEvent.SUCCEEDED and compare_versions(ev_version, target_version) < 0:
        return DeviceProgress(DeviceState.OFFERED, ev_version, True, progress.steps + 1, None)
    err = _error(error) if event.state.failure else None
    if event.state.failure and err is None:
        err = ErrorCode.INTERNAL.value if event is DeviceEvent.FAILED else ErrorCode.SELF_TEST.value
    return DeviceProgress(event.state, ev_version, False, progress.steps, err)


def mark_offered(progress: DeviceProgress, release_version: str) -> DeviceProgress:
    """Progress after the server offered ``release_version`` (the target or a migration step).

    Idempotent: re-offering the release already in progress changes nothing.
    """
    parse_version(release_version)
    if progress.state.finished:
        return progress
    if progress.state is not DeviceState.PENDING and not progress.step_done:
        return progress  # the attempt in progress keeps its state; re-offer is a no-op
    return apply_report(
        progress, DeviceEvent.OFFERED, target_version=release_version, version=release_version
    )


def no_path(progress: DeviceProgress) -> DeviceProgress:
    """A device the server cannot offer anything valid (no update path): failed, E_NO_PATH."""
    if progress.state.finished:
        return progress
    return DeviceProgress(
        DeviceState.FAILED, progress.version, False, progress.steps, ErrorCode.NO_PATH.value
    )


__all__ = [
    "MAX_ERROR",
    "DeviceEvent",
    "DeviceProgress",
    "apply_report",
    "mark_offered",
    "no_path",
]
