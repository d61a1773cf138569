"""What a requester may sign: pure decisions over a request, a credential and the last release.

The service asks :func:`check_request` before anything touches the key. Each refusal raises a
:class:`PolicyError` with its own code so CI can tell "not yours to sign" (E_POLICY) from
"older than what is out there" (E_DOWNGRADE) from "would lower the rollback floor"
(E_SECURITY_COUNTER). Only a security-officer credential may set ``downgrade``; even then the
security counter never goes down, because that counter is what devices burn into their
monotonic storage.

Fast-forward (E_FAST_FORWARD): a counter that jumps far ahead locks every device that installs
it out of all later releases, so a release may raise the security counter by at most
``max_counter_step`` (default 16) and the major version by at most ``max_major_step`` (default
1) over the last signed release, and the counter must stay below ``MAX_SECURITY_COUNTER``
(devices refuse more). A bigger jump needs ``fast_forward``, which, like ``downgrade``, only a
security-officer credential may set; the flag is recorded in the audit log.
"""

from __future__ import annotations

import fnmatch
import json
import re
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from ..crypto.algorithms import HASH_SIZES, HashAlg, hash_alg
from ..errors import ErrorCode, FormatError, OtaError, PolicyError
from ..manifest.conditions import MAX_SECURITY_COUNTER
from ..manifest.ids import class_id, vendor_id
from ..manifest.model import MAX_UINT64, MAX_URI, DeltaInfo
from ..manifest.version import compare_versions, parse_version

MAX_POLICY_FILE = 256 * 1024
DELTA_FIELDS = ("delta_base_digest", "delta_patch_digest", "delta_patch_size", "delta_patch_uri")
MAX_DESCRIPTION = 512
DAY = 86400


class Role(StrEnum):
    RELEASE = "release"  # may request signatures within its policy grants
    SECURITY_OFFICER = "security-officer"  # may also authorize version downgrades
    VIEWER = "viewer"  # authenticated, may not sign (health/public-key only)


SIGNING_ROLES = frozenset({Role.RELEASE, Role.SECURITY_OFFICER})


@dataclass(frozen=True)
class Requester:
    """Who asks: an id from an authenticated credential, and that credential's role."""

    id: str
    role: Role


@dataclass(frozen=True)
class SigningRequest:
    image_digest: bytes
    digest_alg: HashAlg
    image_size: int
    vendor: str  # vendor DNS domain; vendor_id = UUID5(DNS, vendor)
    model: str
    hw_rev: str
    version: str
    min_version: str | None
    security_counter: int
    expires: int | None  # POSIX seconds
    uri: str | None
    description: str | None = None
    downgrade: bool = False  # explicit rollback authorization (security officer only)
    fast_forward: bool = False  # explicit big-jump authorization (security officer only)
    # Delta manifest of an already-signed release (all three set, or none; see docs/delta.md):
    # the service signs it only for a release it signed with exactly these other fields, and
    # gives it that release's sequence number.
    delta_base_digest: bytes | None = None
    delta_patch_digest: bytes | None = None
    delta_patch_size: int | None = None
    delta_patch_uri: str | None = None

    @property
    def delta(self) -> DeltaInfo | None:
        if self.delta_base_digest is None:
            return None
        assert self.delta_patch_digest is not None and self.delta_patch_size is not None
        return DeltaInfo(
            self.delta_base_digest,
            self.delta_patch_digest,
            self.delta_patch_size,
            self.delta_patch_uri,
        )

    def release_fields(self) -> dict[str, Any]:
        """The fields that identify the release itself (what every manifest of it shares)."""
        d = self.to_dict()
        for k in ("downgrade", "fast_forward", *DELTA_FIELDS):
            d.pop(k, None)
        return d

    @property
    def vendor_id(self) -> uuid.UUID:
        return vendor_id(self.vendor)

    @property
    def class_id(self) -> uuid.UUID:
        return class_id(self.vendor_id, self.model, self.hw_rev)

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_digest": self.image_digest.hex(),
            "digest_alg": "sha256" if self.digest_alg == HashAlg.SHA256 else "sha384",
            "image_size": self.image_size,
            "vendor": self.vendor,
            "model": self.model,
            "hw_rev": self.hw_rev,
            "version": self.version,
            "min_version": self.min_version,
            "security_counter": self.security_counter,
            "expires": self.expires,
            "uri": self.uri,
            "description": self.description,
            "downgrade": self.downgrade,
            "fast_forward": self.fast_forward,
        } | self._delta_dict()

    def _delta_dict(self) -> dict[str, Any]:
        # Present only for delta requests, so a service without delta support refuses them
        # (unknown fields) instead of signing a full manifest.
        if self.delta_base_digest is None:
            return {}
        assert self.delta_patch_digest is not None
        return {
            "delta_base_digest": self.delta_base_digest.hex(),
            "delta_patch_digest": self.delta_patch_digest.hex(),
            "delta_patch_size": self.delta_patch_size,
            "delta_patch_uri": self.delta_patch_uri,
        }

    @classmethod
    def from_dict(cls, d: object) -> SigningRequest:
        """Parse and range-check a JSON request; E_MALFORMED names the bad field."""
        if not isinstance(d, dict):
            raise FormatError(ErrorCode.MALFORMED, "signing request must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise FormatError(ErrorCode.MALFORMED, f"unknown request fields {sorted(unknown)}")
        try:
            alg = hash_alg(d.get("digest_alg", "sha256"))
        except OtaError as err:
            raise FormatError(ErrorCode.MALFORMED, err.detail) from None
        delta = d.get("delta_base_digest") is not None
        req = cls(
            image_digest=_digest(d, "image_digest", alg),
            digest_alg=alg,
            image_size=_uint(d, "image_size"),
            vendor=_str(d, "vendor", 253),
            model=_str(d, "model", 128),
            hw_rev=_str(d, "hw_rev", 128),
            version=_str(d, "version", 64),
            min_version=_opt_str(d, "min_version", 64),
            security_counter=_uint(d, "security_counter"),
            expires=_opt_uint(d, "expires"),
            uri=_opt_str(d, "uri", MAX_URI),
            description=_opt_str(d, "description", MAX_DESCRIPTION),
            downgrade=_bool(d, "downgrade"),
            fast_forward=_bool(d, "fast_forward"),
            delta_base_digest=_digest(d, "delta_base_digest", alg) if delta else None,
            delta_patch_digest=_digest(d, "delta_patch_digest", alg) if delta else None,
            delta_patch_size=_uint(d, "delta_patch_size") if delta else None,
            delta_patch_uri=_opt_str(d, "delta_patch_uri", MAX_URI) if delta else None,
        )
        req.validate()
        return req

    def validate(self) -> None:
        parse_version(self.version)
        if self.min_version is not None:
            parse_version(self.min_version)
        parts = (self.delta_base_digest, self.delta_patch_digest, self.delta_patch_size)
        if any(p is not None for p in parts):
            size = HASH_SIZES[HashAlg(self.digest_alg)]
            if not all(p is not None for p in parts) or self.downgrade:
                raise FormatError(
                    ErrorCode.MALFORMED,
                    "a delta request needs base digest, patch digest and size (and no downgrade)",
                )
            for v in (self.delta_base_digest, self.delta_patch_digest):
                if not isinstance(v, bytes) or len(v) != size:
                    raise FormatError(ErrorCode.MALFORMED, f"delta digests must be {size} bytes")
            if self.delta_base_digest == self.image_digest:
                raise FormatError(ErrorCode.MALFORMED, "a delta from an image to itself")
        elif self.delta_patch_uri is not None:
            raise FormatError(ErrorCode.MALFORMED, "delta_patch_uri without a delta")
        # Derivations validate the names (non-empty, no ':' in the model).
        _ = self.class_id


def _digest(d: dict[str, Any], name: str, alg: HashAlg) -> bytes:
    v = _str(d, name)
    if not re.fullmatch(r"[0-9a-fA-F]+", v) or len(v) != 2 * HASH_SIZES[alg]:
        raise FormatError(ErrorCode.MALFORMED, f"{name} must be {HASH_SIZES[alg]} bytes of hex")
    return bytes.fromhex(v)


def _str(d: dict[str, Any], name: str, limit: int = 1024) -> str:
    v = d.get(name)
    if not isinstance(v, str) or not v or len(v) > limit:
        raise FormatError(ErrorCode.MALFORMED, f"{name} must be a non-empty string <= {limit}")
    return v


def _opt_str(d: dict[str, Any], name: str, limit: int) -> str | None:
    return None if d.get(name) is None else _str(d, name, limit)


def _uint(d: dict[str, Any], name: str) -> int:
    v = d.get(name)
    if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_UINT64:
        raise FormatError(ErrorCode.MALFORMED, f"{name} must be an unsigned 64-bit integer")
    return v


def _opt_uint(d: dict[str, Any], name: str) -> int | None:
    return None if d.get(name) is None else _uint(d, name)


def _bool(d: dict[str, Any], name: str) -> bool:
    v = d.get(name, False)
    if not isinstance(v, bool):
        raise FormatError(ErrorCode.MALFORMED, f"{name} must be true or false")
    return v


@dataclass(frozen=True)
class Grant:
    """One permission: vendor domain + model/hw-rev glob patterns (``*`` = any)."""

    vendor: str
    model: str = "*"
    hw_rev: str = "*"

    def covers(self, req: SigningRequest) -> bool:
        return (
            (self.vendor == "*" or self.vendor.lower() == req.vendor.strip().lower())
            and fnmatch.fnmatchcase(req.model, self.model)
            and fnmatch.fnmatchcase(req.hw_rev, self.hw_rev)
        )


@dataclass(frozen=True)
class LastRelease:
    """What the service last signed for one class (model + hw revision)."""

    version: str
    security_counter: int
    sequence: int


@dataclass(frozen=True)
class Policy:
    grants: dict[str, tuple[Grant, ...]]  # requester id -> what it may sign
    require_expiry: bool = True
    max_validity_days: int = 366
    digest_algs: frozenset[HashAlg] = frozenset({HashAlg.SHA256, HashAlg.SHA384})
    max_image_size: int = 1 << 30
    uri_prefixes: tuple[str, ...] = ()  # empty = any URI
    sources: list[str] = field(default_factory=list, compare=False)
    max_counter_step: int = 16  # security-counter rise per release without fast_forward
    max_major_step: int = 1  # major-version rise per release without fast_forward
    # sequence-number rise per release without fast_forward (the sequence follows the
    # signing host's clock: a clock years ahead would burn a future sequence into devices)
    max_sequence_step_days: int = 5 * 366

    @classmethod
    def allow_all(cls, requester: str) -> Policy:
        """The in-process CLI's policy: the local user may sign anything (it holds the key)."""
        return cls(grants={requester: (Grant("*", "*", "*"),)}, require_expiry=False)

    @classmethod
    def from_json(cls, data: bytes) -> Policy:
        """Policy file (JSON)::

        {"version": 1,
         "requesters": {"ci-main": [{"vendor": "example.com", "model": "thermo-*",
                                      "hw_rev": "*"}]},
         "require_expiry": true, "max_validity_days": 366,
         "digest_algs": ["sha256", "sha384"], "max_image_size": 1073741824,
         "uri_prefixes": ["https://updates.example.com/"]}
        """
        if len(data) > MAX_POLICY_FILE:
            raise FormatError(ErrorCode.TOO_LARGE, "policy file too large")
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as exc:
            raise FormatError(ErrorCode.MALFORMED, f"policy is not JSON: {exc}") from None
        if not isinstance(obj, dict) or obj.get("version") != 1:
            raise FormatError(ErrorCode.MALFORMED, 'policy must be an object with "version": 1')
        allowed = {
            "version",
            "requesters",
            "require_expiry",
            "max_validity_days",
            "digest_algs",
            "max_image_size",
            "uri_prefixes",
            "max_counter_step",
            "max_major_step",
            "max_sequence_step_days",
        }
        if set(obj) - allowed:
            raise FormatError(
                ErrorCode.MALFORMED, f"unknown policy keys {sorted(set(obj) - allowed)}"
            )
        reqs = obj.get("requesters")
        if not isinstance(reqs, dict):
            raise FormatError(ErrorCode.MALFORMED, "policy.requesters must be an object")
        grants: dict[str, tuple[Grant, ...]] = {}
        for rid, items in reqs.items():
            if not isinstance(items, list):
                raise FormatError(ErrorCode.MALFORMED, f"grants of {rid!r} must be a list")
            gl = []
            for g in items:
                if not isinstance(g, dict) or set(g) - {"vendor", "model", "hw_rev"}:
                    raise FormatError(ErrorCode.MALFORMED, f"bad grant for {rid!r}: {g!r}")
                vals = [g.get("vendor"), g.get("model", "*"), g.get("hw_rev", "*")]
                if not all(isinstance(v, str) and v for v in vals):
                    raise FormatError(ErrorCode.MALFORMED, f"bad grant for {rid!r}: {g!r}")
                gl.append(Grant(str(vals[0]), str(vals[1]), str(vals[2])))
            grants[rid] = tuple(gl)
        try:
            algs = frozenset(hash_alg(a) for a in obj.get("digest_algs", ["sha256", "sha384"]))
        except OtaError as err:
            raise FormatError(ErrorCode.MALFORMED, err.detail) from None
        days = obj.get("max_validity_days", 366)
        size = obj.get("max_image_size", 1 << 30)
        prefixes = obj.get("uri_prefixes", [])
        req_exp = obj.get("require_expiry", True)
        if not isinstance(days, int) or days <= 0 or not isinstance(size, int) or size <= 0:
            raise FormatError(ErrorCode.MALFORMED, "max_validity_days/max_image_size must be > 0")
        if not isinstance(prefixes, list) or not all(isinstance(p, str) for p in prefixes):
            raise FormatError(ErrorCode.MALFORMED, "uri_prefixes must be a list of strings")
        if not isinstance(req_exp, bool):
            raise FormatError(ErrorCode.MALFORMED, "require_expiry must be a boolean")
        step = obj.get("max_counter_step", 16)
        major = obj.get("max_major_step", 1)
        seq_days = obj.get("max_sequence_step_days", 5 * 366)
        if not all(
            isinstance(v, int) and not isinstance(v, bool) for v in (step, major, seq_days)
        ) or (step < 1 or major < 0 or seq_days < 1):
            raise FormatError(
                ErrorCode.MALFORMED,
                "max_counter_step and max_sequence_step_days must be >= 1, max_major_step >= 0",
            )
        return cls(
            grants,
            req_exp,
            days,
            algs,
            size,
            tuple(prefixes),
            max_counter_step=step,
            max_major_step=major,
            max_sequence_step_days=seq_days,
        )


def check_request(
    policy: Policy,
    req: SigningRequest,
    requester: Requester | None,
    last: LastRelease | None,
    now: int,
) -> None:
    """Raise PolicyError (E_AUTH, E_FORBIDDEN, E_POLICY, E_DOWNGRADE, E_SECURITY_COUNTER)."""
    if requester is None or not requester.id:
        raise PolicyError(ErrorCode.AUTH, "no authenticated requester")
    if requester.role not in SIGNING_ROLES:
        raise PolicyError(ErrorCode.FORBIDDEN, f"role {requester.role.value!r} may not sign")
    if req.downgrade and requester.role != Role.SECURITY_OFFICER:
        raise PolicyError(
            ErrorCode.FORBIDDEN, "only a security-officer credential may authorize a downgrade"
        )
    if req.fast_forward and requester.role != Role.SECURITY_OFFICER:
        raise PolicyError(
            ErrorCode.FORBIDDEN, "only a security-officer credential may authorize a fast-forward"
        )
    if req.security_counter > MAX_SECURITY_COUNTER:
        raise PolicyError(
            ErrorCode.FAST_FORWARD,
            f"security counter {req.security_counter} is above {MAX_SECURITY_COUNTER}; "
            "devices refuse it (never allowed)",
        )
    grants = policy.grants.get(requester.id, ())
    if not any(g.covers(req) for g in grants):
        raise PolicyError(
            ErrorCode.POLICY,
            f"requester {requester.id!r} may not sign for {req.vendor} {req.model}/{req.hw_rev}",
        )
    if req.digest_alg not in policy.digest_algs:
        raise PolicyError(ErrorCode.POLICY, f"digest algorithm {req.digest_alg.name} not allowed")
    if req.image_size == 0 or req.image_size > policy.max_image_size:
        raise PolicyError(ErrorCode.POLICY, f"image size {req.image_size} outside policy")
    if req.expires is None:
        if policy.require_expiry:
            raise PolicyError(ErrorCode.POLICY, "policy requires an expiry (bounds a freeze)")
    else:
        if req.expires <= now:
            raise PolicyError(ErrorCode.POLICY, "expiry is in the past")
        if req.expires - now > policy.max_validity_days * DAY:
            raise PolicyError(
                ErrorCode.POLICY, f"expiry more than {policy.max_validity_days} days ahead"
            )
    if policy.uri_prefixes and (
        req.uri is None or not any(req.uri.startswith(p) for p in policy.uri_prefixes)
    ):
        raise PolicyError(ErrorCode.POLICY, f"uri {req.uri!r} not under an allowed prefix")
    if req.min_version is not None and compare_versions(req.min_version, req.version) > 0:
        raise PolicyError(ErrorCode.POLICY, "min_version is above version")
    if req.delta is not None:
        if not 0 < req.delta.patch_size <= policy.max_image_size:
            raise PolicyError(ErrorCode.POLICY, f"patch size {req.delta.patch_size} outside policy")
        p_uri = req.delta.patch_uri
        if (
            policy.uri_prefixes
            and p_uri is not None
            and not any(p_uri.startswith(p) for p in policy.uri_prefixes)
        ):
            raise PolicyError(ErrorCode.POLICY, f"patch uri {p_uri!r} not under an allowed prefix")
    if last is None:
        return
    if req.security_counter < last.security_counter:
        raise PolicyError(
            ErrorCode.SECURITY_COUNTER,
            f"security counter {req.security_counter} is below the last signed "
            f"{last.security_counter} for this model (never allowed)",
        )
    if not req.fast_forward:
        if req.security_counter - last.security_counter > policy.max_counter_step:
            raise PolicyError(
                ErrorCode.FAST_FORWARD,
                f"security counter {req.security_counter} jumps more than "
                f"{policy.max_counter_step} above the last signed {last.security_counter}; "
                "a fast-forward needs explicit security-officer authorization",
            )
        major_new, major_last = _major(req.version), _major(last.version)
        if major_new - major_last > policy.max_major_step:
            raise PolicyError(
                ErrorCode.FAST_FORWARD,
                f"version {req.version} jumps more than {policy.max_major_step} major "
                f"version(s) above the last signed {last.version}; a fast-forward needs "
                "explicit security-officer authorization",
            )
    if compare_versions(req.version, last.version) <= 0 and not req.downgrade:
        raise PolicyError(
            ErrorCode.DOWNGRADE,
            f"version {req.version} is not above the last signed {last.version}; a downgrade "
            "needs explicit security-officer authorization",
        )


MAX_SIGNED_SEQUENCE = 2**32 - 1  # POSIX seconds: February 2106


def check_sequence(policy: Policy, last_sequence: int, now: int, fast_forward: bool) -> int:
    """The sequence number a new release gets, ``max(last + 1, now)``, or E_FAST_FORWARD.

    The sequence follows the signing host's clock, so a service restored from an old backup
    still issues numbers devices accept; but a clock set years ahead would burn a future
    sequence into every device that installs the release, which then refuses every later
    legitimate one (``E_REPLAY``) until the real date catches up. So a rise of more than
    ``max_sequence_step_days`` over the last issued number needs a security officer's
    ``fast_forward``, and a number beyond 2106 is never signed (devices accept up to 2^40).
    """
    seq = max(last_sequence + 1, now)
    if seq > MAX_SIGNED_SEQUENCE:
        raise PolicyError(
            ErrorCode.FAST_FORWARD,
            f"sequence number {seq} (the signing host's clock) is beyond {MAX_SIGNED_SEQUENCE}:"
            " check the clock (never allowed)",
        )
    step = policy.max_sequence_step_days * DAY
    if last_sequence > 0 and seq - last_sequence > step and not fast_forward:
        days = (seq - last_sequence) // DAY
        raise PolicyError(
            ErrorCode.FAST_FORWARD,
            f"the signing host's clock puts this release's sequence number {days} days after "
            f"the last one issued (more than {policy.max_sequence_step_days}): check the clock;"
            " a fast-forward needs explicit security-officer authorization",
        )
    return seq


def _major(version: str) -> int:
    """The leading numeric component of a version (0 if it has none)."""
    head = version.split(".", 1)[0]
    return int(head) if head.isdigit() else 0
