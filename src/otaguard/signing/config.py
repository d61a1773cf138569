"""The HTTP signing service's configuration file (JSON).

::

    {"version": 1,
     "signer": {"pkcs11_uri": "pkcs11:token=ota;object=release-2026",
                "pkcs11_module": "/usr/lib/softhsm/libsofthsm2.so", "alg": "ed25519"},
     "audit_log": "audit.log", "state": "signing-state.sqlite", "policy": "policy.json",
     "seal_every": 16, "max_body": 65536,
     "sign_rate": {"per_minute": 30, "burst": 10},
     "tokens": [{"sha256": "<hex of SHA-256(token)>", "requester": "ci-main",
                 "role": "release", "not_after": "2027-02-21T00:00:00Z"}]}

Relative paths are relative to the config file. ``not_after`` (optional, RFC 3339 UTC, whole
seconds, ``Z`` or ``+00:00``) is the last instant the token is accepted; after it requests get
401 ``E_AUTH`` "token expired". An entry without it never expires (older configs);
``otaguard signing token`` writes one by default (``--valid-for 90d``). ``sign_rate``
(optional; default 30 per minute, burst 10) limits ``POST /v1/sign`` per requester id; over it
the service answers 429 ``E_RATE_LIMIT`` with ``Retry-After``.

Secrets are never in the file: the PIN comes from ``$OTAGUARD_PKCS11_PIN`` (or the key-file
passphrase from ``$OTAGUARD_KEY_PASSPHRASE``), and tokens are stored only as
hashes (``otaguard signing token`` prints a new one).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import ErrorCode, FormatError
from ..fsutil import read_limited
from .audit import DEFAULT_SEAL_EVERY
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
}
_SIGNER_KEYS = {"pkcs11_uri", "pkcs11_module", "key_file", "alg"}


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
        )
