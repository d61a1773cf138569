"""Update paths: which release to offer a device so it never gets a manifest it must refuse.

A release can only be installed by a device whose running version is at least the release's
``min_version``, whose security counter is not above the release's, and that runs an older
version. When the campaign's target is out of reach, the device is offered a migration step
first: the newest release of the same class that it can take and from which the target is still
reachable. Taking the newest reachable step is also the shortest path: a higher running version
satisfies every min_version a lower one does, so anything reachable from a lower version is
reachable from a higher one (and steps above the target's security counter are never used, as
the device would then refuse the target).
"""

from __future__ import annotations

from collections.abc import Iterable

from ..errors import ErrorCode, FormatError
from ..manifest.version import compare_versions
from .model import CampaignError, ReleaseInfo, version_key

MAX_RELEASES = 2_000  # per call; the search is O(R²)


_norm = version_key


def _takes(running: tuple[int, ...], counter: int | None, r: ReleaseInfo) -> bool:
    """Whether a device at (running, counter) would accept ``r`` (version/counter checks)."""
    if _norm(r.version) <= running:
        return False
    if r.min_version is not None and running < _norm(r.min_version):
        return False
    return counter is None or r.security_counter >= counter


def update_path(
    running_version: str,
    target: ReleaseInfo,
    releases: Iterable[ReleaseInfo],
    *,
    security_counter: int | None = None,
) -> list[ReleaseInfo]:
    """The releases to install in order to reach ``target`` (the last one is ``target``).

    ``[]`` when the device already runs ``target``'s version or newer. Raises E_NO_PATH when no
    chain of releases of the target's model/hw-rev gets there (E_MALFORMED for a bad version).
    """
    try:
        running = _norm(running_version)
    except FormatError:
        raise CampaignError(
            ErrorCode.NO_PATH, f"device version {running_version!r} is not a version"
        ) from None
    goal = _norm(target.version)
    if running >= goal:
        return []
    steps: dict[tuple[int, ...], ReleaseInfo] = {}
    for i, r in enumerate(releases):
        if i >= MAX_RELEASES:
            raise CampaignError(ErrorCode.TOO_LARGE, f"more than {MAX_RELEASES} releases")
        if (r.model, r.hw_rev) != (target.model, target.hw_rev):
            continue
        v = _norm(r.version)
        if running < v < goal and r.security_counter <= target.security_counter:
            steps.setdefault(v, r)
    ordered = sorted(steps.values(), key=lambda r: _norm(r.version), reverse=True)
    # after[i]: the path that follows once ordered[i] is installed. Filled from the newest down,
    # so every release it may step to (all newer) is already solved: no recursion, O(R²).
    after: list[list[ReleaseInfo] | None] = []

    def best(at: tuple[int, ...], counter: int | None) -> list[ReleaseInfo] | None:
        if _takes(at, counter, target):
            return [target]
        for r, rest in zip(ordered, after, strict=False):
            if rest is not None and _takes(at, counter, r):
                return [r, *rest]
        return None

    for r in ordered:
        after.append(best(_norm(r.version), r.security_counter))

    path = best(running, security_counter)
    if path is None:
        raise CampaignError(
            ErrorCode.NO_PATH,
            f"no release chain takes {target.model}:{target.hw_rev} from {running_version} to "
            f"{target.version} (target needs ≥ {target.min_version})",
        )
    return path


def next_release_for(
    device_running_version: str,
    target_release: ReleaseInfo,
    releases: Iterable[ReleaseInfo],
    *,
    security_counter: int | None = None,
) -> ReleaseInfo | None:
    """The release to offer now: ``target_release`` itself, or the migration step toward it.

    None when there is nothing to offer: the device is already on the target version (or
    newer), or no path exists (:func:`update_path` tells which, with E_NO_PATH).
    """
    try:
        path = update_path(
            device_running_version, target_release, releases, security_counter=security_counter
        )
    except CampaignError as e:
        if e.code is ErrorCode.NO_PATH:
            return None
        raise
    return path[0] if path else None


def is_up_to_date(device_running_version: str, target_release: ReleaseInfo) -> bool:
    try:
        return compare_versions(device_running_version, target_release.version) >= 0
    except FormatError:
        return False
