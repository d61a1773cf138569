"""The HTTP signing service's configuration file (JSON).

::

    {"version": 1,
     "signer": {"pkcs11_uri": "pkcs11:token=ota;object=release-2026",
                "pkcs11_module": "/usr/lib/softhsm/libsofthsm2.so", "alg": "ed25519"},
     "audit_sealer": {"pkcs11_uri": "pkcs11:token=ota-audit;object=audit-2026"},
     "audit_log": "audit.log", "state": "signing-state.sqlite", "policy": "policy.json",
     "seal_every": 16, "max_body": 65536,
     "sign_rate": {"per_minute": 30, "burst": 10},
     "tokens": [{"sha256": "<hex of SHA-256(token)>", "requester": "ci-main",
                 "role": "release", "not_after": "2027-02-21T00:00:00Z"}],
     "cosign": {"threshold": 2, "ttl_hours": 24, "four_eyes": true,
                "officers": {"alice": {"pkcs11_uri": "pkcs11:token=ota;object=officer-alice"},
                             "bob": {"pkcs11_uri": "pkcs11:token=ota;object=officer-bob"}}}}

Relative paths are relative to the config file. ``not_after`` (optional, RFC 3339 UTC, whole
seconds, ``Z`` or ``+00:00``) is the last instant the token is accepted; after it requests get
401 ``E_AUTH`` "token expired". An entry without it never expires (older configs);
``otaguard signing token`` writes one by default (``--valid-for 90d``). ``sign_rate``
(optional; default 30 per minute, burst 10) limits ``POST /v1/sign`` per requester id; over it
the service answers 429 ``E_RATE_LIMIT`` with ``Retry-After``.

``cosign`` (optional) turns on co-signing (:mod:`.cosign`, the two-person rule): each officer
is a token requester id bound to its own signing key (same fields as ``signer``); no two
officers may share a key, every officer needs a token entry, and ``threshold`` (at most the
number of officers) distinct officers must approve a request before its envelopes are released.
``ttl_hours`` (default 24, at most 720) bounds how long a request waits; ``four_eyes`` (default
true) forbids a requester to approve their own request.

``audit_sealer`` (required; same fields as ``signer``) is the key that seals the audit log:
a key of its own, authorized by the root for the audit role only (``otaguard keys
authorize-audit``); the service refuses to start when it is the signing key or an officer's.

Secrets are never in the file: the PIN comes from ``$OTAGUARD_PKCS11_PIN`` (or the key-file
passphrase from ``$OTAGUARD_KEY_PASSPHRASE``), and tokens are stored only as
hashes (``otaguard signing token`` prints a new one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ErrorCode, FormatError
from ..fsutil import read_limited
from .audit import DEFAULT_SEAL_EVERY
from .cosign import CosignConfig
from .http import DEFAULT_MAX_BODY, DEFAULT_SIGN_RATE, SignRate, TokenTable
from .policy import Policy

MAX_CONFIG = 256 * 1024
_KEYS = {
    "version",
    "signer",
    "audit_log",
    "state",
    "policy",
    "seal_every",
    "max_body",
    "sign_rate",
    "tokens",
    "cosign",
    "audit_sealer",
}
_COSIGN_KEYS = {"threshold", "ttl_hours", "four_eyes", "officers"}
_SIGNER_KEYS = {"pkcs11_uri", "pkcs11_module", "key_file", "alg"}


@dataclass(frozen=True)
class SignerSpec:
    """Where a key is: a PKCS#11 URI (production) or a development key file."""

    pkcs11_uri: str | None
    pkcs11_module: str | None
    key_file: Path | None
    alg: str | None


def _signer_spec(obj: object, what: str, p: Path) -> SignerSpec:
    if not isinstance(obj, dict) or set(obj) - _SIGNER_KEYS:
        raise FormatError(ErrorCode.MALFORMED, f"{p}: {what} must be an object of {_SIGNER_KEYS}")
    for k, v in obj.items():
        if not isinstance(v, str):
            raise FormatError(ErrorCode.MALFORMED, f"{p}: {what}.{k} must be a string")
    if bool(obj.get("pkcs11_uri")) == bool(obj.get("key_file")):
        raise FormatError(
            ErrorCode.MALFORMED, f"{p}: {what} needs exactly one of pkcs11_uri and key_file"
        )
    kf = obj.get("key_file")
    return SignerSpec(
        obj.get("pkcs11_uri"), obj.get("pkcs11_module"), p.parent / kf if kf else None,
        obj.get("alg"),
    )  # fmt: skip


def _cosign(
    obj: object, tokens: TokenTable, p: Path
) -> tuple[CosignConfig | None, dict[str, SignerSpec]]:
    if obj is None:
        return None, {}
    if not isinstance(obj, dict) or set(obj) - _COSIGN_KEYS:
        raise FormatError(ErrorCode.MALFORMED, f"{p}: cosign must be an object of {_COSIGN_KEYS}")
    threshold, hours = obj.get("threshold"), obj.get("ttl_hours", 24)
    four_eyes, officers = obj.get("four_eyes", True), obj.get("officers")
    if (
        not isinstance(threshold, int)
        or isinstance(threshold, bool)
        or not isinstance(hours, int)
        or isinstance(hours, bool)
        or not isinstance(four_eyes, bool)
        or not isinstance(officers, dict)
        or not officers
    ):
        raise FormatError(
            ErrorCode.MALFORMED,
            f"{p}: cosign needs an integer threshold, integer ttl_hours, boolean four_eyes and "
            "a non-empty officers object",
        )
    known = {e.requester for e in tokens.entries}
    specs: dict[str, SignerSpec] = {}
    for name, spec in officers.items():
        if name not in known:
            raise FormatError(ErrorCode.MALFORMED, f"{p}: cosign officer {name!r} has no token")
        specs[name] = _signer_spec(spec, f"cosign.officers.{name}", p)
    if threshold > len(specs):
        raise FormatError(
            ErrorCode.MALFORMED, f"{p}: cosign threshold {threshold} exceeds the officers"
        )
    try:
        cfg = CosignConfig(threshold, hours * 3600, four_eyes)
    except FormatError as err:
        raise FormatError(err.code, f"{p}: {err.detail}") from None
    return cfg, specs


@dataclass(frozen=True)
class ServiceConfig:
    pkcs11_uri: str | None
    pkcs11_module: str | None
    key_file: Path | None
    alg: str | None
    audit_log: Path
    state: Path
    policy: Policy
    tokens: TokenTable
    seal_every: int = DEFAULT_SEAL_EVERY
    max_body: int = DEFAULT_MAX_BODY
    sign_rate: SignRate = DEFAULT_SIGN_RATE
    cosign: CosignConfig | None = None
    officers: dict[str, SignerSpec] = field(default_factory=dict)
    # The audit log's sealing key: required by load(), and never a signing key (checked when
    # the keys are opened, :func:`.audit_key.check_separate`).
    audit_sealer: SignerSpec | None = None

    @classmethod
    def load(cls, path: str | Path) -> ServiceConfig:
        p = Path(path)
        try:
            obj = json.loads(read_limited(p, MAX_CONFIG))
        except (ValueError, UnicodeDecodeError) as exc:
            raise FormatError(ErrorCode.MALFORMED, f"{p}: not JSON: {exc}") from None
        if not isinstance(obj, dict) or obj.get("version") != 1:
            raise FormatError(ErrorCode.MALFORMED, f'{p}: want an object with "version": 1')
        if set(obj) - _KEYS:
            raise FormatError(ErrorCode.MALFORMED, f"{p}: unknown keys {sorted(set(obj) - _KEYS)}")
        base = p.parent
        signer = obj.get("signer")
        if not isinstance(signer, dict) or set(signer) - _SIGNER_KEYS:
            raise FormatError(
                ErrorCode.MALFORMED, f"{p}: signer must be an object of {_SIGNER_KEYS}"
            )
        for k, v in signer.items():
            if not isinstance(v, str):
                raise FormatError(ErrorCode.MALFORMED, f"{p}: signer.{k} must be a string")

        def path_of(key: str) -> Path:
            v = obj.get(key)
            if not isinstance(v, str) or not v:
                raise FormatError(ErrorCode.MALFORMED, f"{p}: {key} must be a path string")
            return base / v

        policy_path = path_of("policy")
        seal_every = obj.get("seal_every", DEFAULT_SEAL_EVERY)
        max_body = obj.get("max_body", DEFAULT_MAX_BODY)
        for name, v in (("seal_every", seal_every), ("max_body", max_body)):
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise FormatError(ErrorCode.MALFORMED, f"{p}: {name} must be a positive integer")
        key_file = signer.get("key_file")
        try:
            tokens = TokenTable.from_config(obj.get("tokens"))
            sign_rate = SignRate.from_config(obj.get("sign_rate"))
        except FormatError as err:
            raise FormatError(err.code, f"{p}: {err.detail}") from None
        cosign, officers = _cosign(obj.get("cosign"), tokens, p)
        if "audit_sealer" not in obj:
            raise FormatError(
                ErrorCode.MALFORMED,
                f"{p}: audit_sealer is required: the audit log is sealed by a key of its own "
                "(authorized with 'keys authorize-audit'), never by the release key",
            )
        audit_sealer = _signer_spec(obj["audit_sealer"], "audit_sealer", p)
        return cls(
            pkcs11_uri=signer.get("pkcs11_uri"),
            pkcs11_module=signer.get("pkcs11_module"),
            key_file=base / key_file if key_file else None,
            alg=signer.get("alg"),
            audit_log=path_of("audit_log"),
            state=path_of("state"),
            policy=Policy.from_json(read_limited(policy_path, MAX_CONFIG)),
            tokens=tokens,
            seal_every=seal_every,
            max_body=max_body,
            sign_rate=sign_rate,
            cosign=cosign,
            officers=officers,
            audit_sealer=audit_sealer,
        )
