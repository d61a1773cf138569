"""Build and check TUF metadata (the four top-level roles), pure: no files, no network.

Who signs what (docs/formats.md#tuf-repository):

- ``root``: the fleet's offline root key(s); names the keys of every role. A new root version
  must carry the signatures of a threshold of the *old* root's keys and of its own keys (TUF
  spec 5.3.4/5.3.5), which :func:`check_root_update` checks before the server stores it.
- ``targets``: the operational release key (in the HSM), through the signing service's one
  policy path; lists the release images (length, sha256, otaguard fields under ``custom``).
- ``snapshot`` and ``timestamp``: the update server's online keys. They only say *which*
  targets version is current and that the repository is fresh; they cannot add a target.

Consistent snapshots are on: clients fetch ``N.snapshot.json``, ``N.targets.json`` and
``targets/<sha256>.<name>``, so a publication never changes a file a client is reading.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from securesystemslib.signer import Signer as SslibSigner
from tuf.api import exceptions as tuf_exc
from tuf.api.metadata import (
    Metadata,
    MetaFile,
    Role,
    Root,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization import DeserializationError

from ..crypto.keys import PublicKey
from ..errors import ErrorCode, FormatError, OtaError
from .signer import tuf_key

T = TypeVar("T", Root, Timestamp, Snapshot, Targets)

MAX_METADATA = 512 * 1024  # bytes of one uploaded root/targets document
TOP_ROLES = ("root", "targets", "snapshot", "timestamp")
_PATH_PART = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9._+-]{0,63}\Z")
IMAGE_NAME = "image.bin"


def utc(ts: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ts, dt.UTC)


def posix(when: dt.datetime) -> int:
    return int(when.timestamp())


def target_path(model: str, hw_rev: str) -> str:
    """One target path per device class: ``<model>/<hw_rev>/image.bin``. A device's TUF client
    asks for its class's path; a new release replaces the entry (``custom`` says which)."""
    for part in (model, hw_rev):
        if not _PATH_PART.match(part) or part in (".", ".."):
            raise OtaError(
                ErrorCode.USAGE,
                f"{part!r} cannot be a TUF target path component (letters, digits, . _ + -)",
            )
    return f"{model}/{hw_rev}/{IMAGE_NAME}"


def build_root(
    *,
    version: int,
    expires: int,
    root_keys: Sequence[PublicKey],
    root_threshold: int,
    targets_keys: Sequence[PublicKey],
    targets_threshold: int,
    snapshot_key: PublicKey,
    timestamp_key: PublicKey,
) -> Metadata[Root]:
    """Root metadata naming each role's keys (unsigned: the ceremony signs it)."""
    if not (0 < root_threshold <= len(root_keys)) or not (
        0 < targets_threshold <= len(targets_keys)
    ):
        raise OtaError(ErrorCode.USAGE, "a threshold must be between 1 and the number of keys")
    online = {snapshot_key.thumbprint, timestamp_key.thumbprint}
    offline = {k.thumbprint for k in (*root_keys, *targets_keys)}
    if online & offline:
        raise OtaError(
            ErrorCode.USAGE,
            "a snapshot/timestamp (online) key must not also be a root or targets key",
        )
    root = Root(version=version, expires=utc(expires), consistent_snapshot=True)
    root.roles = {name: Role([], 1) for name in TOP_ROLES}
    root.roles["root"].threshold = root_threshold
    root.roles["targets"].threshold = targets_threshold
    for name, keys in (
        ("root", root_keys),
        ("targets", targets_keys),
        ("snapshot", [snapshot_key]),
        ("timestamp", [timestamp_key]),
    ):
        for k in keys:
            root.add_key(tuf_key(k), name)
    return Metadata(root)


def sign(md: Metadata[T], signers: Sequence[SslibSigner]) -> bytes:
    """Sign with every signer and serialize (python-tuf's canonical compact JSON)."""
    for s in signers:
        md.sign(s, append=True)
    return md.to_bytes()


def target_custom(
    *, version: str, security_counter: int, model: str, hw_rev: str, sequence: int
) -> dict[str, Any]:
    return {
        "otaguard": {
            "version": version,
            "security_counter": security_counter,
            "model": model,
            "hw_rev": hw_rev,
            "sequence": sequence,
        }
    }


def build_targets(
    *,
    version: int,
    expires: int,
    path: str,
    length: int,
    sha256: bytes,
    custom: Mapping[str, Any],
    previous: Metadata[Targets] | None = None,
) -> Metadata[Targets]:
    """Targets metadata: the previous document's targets (other classes) plus this release."""
    files: dict[str, TargetFile] = dict(previous.signed.targets) if previous else {}
    files[path] = TargetFile(length, {"sha256": sha256.hex()}, path, {"custom": dict(custom)})
    return Metadata(Targets(version=version, expires=utc(expires), targets=files))


def build_snapshot(version: int, expires: int, targets_version: int) -> Metadata[Snapshot]:
    return Metadata(
        Snapshot(
            version=version, expires=utc(expires), meta={"targets.json": MetaFile(targets_version)}
        )
    )


def build_timestamp(version: int, expires: int, snapshot_version: int) -> Metadata[Timestamp]:
    return Metadata(
        Timestamp(version=version, expires=utc(expires), snapshot_meta=MetaFile(snapshot_version))
    )


def parse(data: bytes, cls: type[T]) -> Metadata[T]:
    """Parse one role's metadata or raise E_MALFORMED / E_TOO_LARGE."""
    if len(data) > MAX_METADATA:
        raise FormatError(ErrorCode.TOO_LARGE, f"TUF metadata over {MAX_METADATA} bytes")
    try:
        md = Metadata[T].from_bytes(data)
    except DeserializationError as exc:
        raise FormatError(ErrorCode.MALFORMED, f"not TUF metadata: {exc}") from None
    if not isinstance(md.signed, cls):
        raise FormatError(
            ErrorCode.MALFORMED, f"expected {cls.type} metadata, got {md.signed.type}"
        )
    return md


def _verify(delegator: Root, role: str, md: Metadata[Any]) -> None:
    try:
        delegator.verify_delegate(role, md.signed_bytes, md.signatures)
    except tuf_exc.UnsignedMetadataError as exc:
        raise OtaError(ErrorCode.SIGNATURE, f"{role}: {exc}") from None


def check_expiry(md: Metadata[Any], now: int, max_validity: int) -> None:
    """E_EXPIRED if already expired; E_POLICY if it expires more than ``max_validity``
    seconds from ``now`` (a far expiry turns a later freeze into a long one)."""
    exp = posix(md.signed.expires)
    if exp <= now:
        raise OtaError(ErrorCode.EXPIRED, f"{md.signed.type} metadata has already expired")
    if exp - now > max_validity:
        raise OtaError(
            ErrorCode.POLICY,
            f"{md.signed.type} metadata expires {(exp - now) // 86400} days ahead, more than "
            f"the policy's {max_validity // 86400}",
        )


def check_root_update(trusted: Metadata[Root], data: bytes, now: int) -> Metadata[Root]:
    """The next root version, signed by a threshold of the old root's keys and of its own
    (what a TUF client checks on its way along the root chain)."""
    new = parse(data, Root)
    if new.signed.version != trusted.signed.version + 1:
        raise OtaError(
            ErrorCode.REPLAY,
            f"root version {new.signed.version} does not follow {trusted.signed.version}",
        )
    _verify(trusted.signed, "root", new)
    _verify(new.signed, "root", new)
    _check_roles(new.signed)
    if posix(new.signed.expires) <= now:
        raise OtaError(ErrorCode.EXPIRED, "root metadata has already expired")
    return new


def check_first_root(data: bytes, now: int) -> Metadata[Root]:
    """A first (bootstrap) root: self-signed to its threshold, all four roles present."""
    md = parse(data, Root)
    _verify(md.signed, "root", md)
    _check_roles(md.signed)
    if posix(md.signed.expires) <= now:
        raise OtaError(ErrorCode.EXPIRED, "root metadata has already expired")
    return md


def _check_roles(root: Root) -> None:
    missing = [r for r in TOP_ROLES if r not in root.roles]
    if missing:
        raise FormatError(ErrorCode.MALFORMED, f"root names no keys for {missing}")
    if not root.consistent_snapshot:
        raise OtaError(ErrorCode.UNSUPPORTED, "otaguard serves consistent snapshots only")


def check_targets(
    root: Metadata[Root], data: bytes, now: int, max_validity: int, current_version: int
) -> Metadata[Targets]:
    """Uploaded targets metadata: signed by the root's targets keys, not expired, expiry
    within policy, and a version above the one published (E_REPLAY)."""
    md = parse(data, Targets)
    _verify(root.signed, "targets", md)
    check_expiry(md, now, max_validity)
    if md.signed.version <= current_version:
        raise OtaError(
            ErrorCode.REPLAY,
            f"targets version {md.signed.version} is not above the published {current_version}",
        )
    if md.signed.delegations is not None:
        raise OtaError(ErrorCode.UNSUPPORTED, "delegated targets roles are not served")
    for path, info in md.signed.targets.items():
        if not re.fullmatch(r"[0-9a-f]{64}", info.hashes.get("sha256", "")):
            raise OtaError(ErrorCode.UNSUPPORTED, f"target {path!r} has no sha256 hash")
    return md
