"""Which COSE signature algorithms each device class can verify.

Many MCU SUIT processors have no Ed25519 (or know ES256 but not the fully-specified ESP256),
so the signature algorithm is a property of the device class, chosen when a key is authorized
for it (``keys authorize --class-alg MODEL:HWREV=ALG[,ALG]``) and checked again before a
release for the class is signed (``release create --class-algs``). The table lives on the
release side only; devices learn nothing new: an algorithm they cannot verify would simply
fail there (E_ALGORITHM), which is what the check prevents before anything is signed.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..crypto.algorithms import ALG_KEY_KIND, CoseAlg, parse_alg_name
from ..crypto.cose import decode_sign1
from ..errors import CryptoError, ErrorCode, FormatError, UsageError
from . import suit
from .envelope import loads_nested, parse_auth_wrapper, parse_envelope
from .ids import class_id

FORMAT = "otaguard/class-algs/v1"
ALG_NAMES = {
    CoseAlg.ED25519: "ed25519",
    CoseAlg.EDDSA: "eddsa",
    CoseAlg.ESP256: "esp256",
    CoseAlg.ES256: "es256",
}
MAX_TABLE = 1 << 20


@dataclass(frozen=True)
class ClassAlgs:
    """class-id -> (human label, algorithms the class verifies). Classes not in the table are
    not restricted (every algorithm otaguard signs with)."""

    entries: dict[uuid.UUID, tuple[str, frozenset[CoseAlg]]] = field(default_factory=dict)

    def algs(self, cid: uuid.UUID) -> frozenset[CoseAlg] | None:
        entry = self.entries.get(cid)
        return None if entry is None else entry[1]

    def require(self, cid: uuid.UUID, algs: Iterable[CoseAlg], what: str) -> None:
        """E_ALGORITHM unless every one of ``algs`` (what ``what`` signs with) is verifiable
        by class ``cid``."""
        entry = self.entries.get(cid)
        if entry is None:
            return
        label, allowed = entry
        for alg in algs:
            if alg not in allowed:
                raise CryptoError(
                    ErrorCode.ALGORITHM,
                    f"{what} signs with {ALG_NAMES[alg]}, which class {label} cannot verify "
                    f"(it verifies {names(allowed)})",
                )

    def require_kind(self, cid: uuid.UUID, kind: str, what: str) -> None:
        """E_ALGORITHM unless the class verifies some algorithm of a ``kind`` key (for a remote
        signer, whose exact algorithm is known only from what it signs)."""
        entry = self.entries.get(cid)
        if entry is not None and not any(ALG_KEY_KIND[a] == kind for a in entry[1]):
            raise CryptoError(
                ErrorCode.ALGORITHM,
                f"{what} is a {kind} key; class {entry[0]} verifies only {names(entry[1])}",
            )

    def with_entry(self, cid: uuid.UUID, label: str, algs: frozenset[CoseAlg]) -> ClassAlgs:
        return ClassAlgs({**self.entries, cid: (label, algs)})

    def to_json(self) -> bytes:
        classes = {
            str(cid): {"class": label, "algs": sorted(ALG_NAMES[a] for a in algs)}
            for cid, (label, algs) in sorted(self.entries.items(), key=lambda e: str(e[0]))
        }
        return (json.dumps({"format": FORMAT, "classes": classes}, indent=2) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes) -> ClassAlgs:
        try:
            doc = json.loads(data)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise ValueError("not an otaguard class-algs table")
            entries: dict[uuid.UUID, tuple[str, frozenset[CoseAlg]]] = {}
            for key, value in doc["classes"].items():
                algs = frozenset(parse_alg_name(str(a)) for a in value["algs"])
                if not algs or not isinstance(value["class"], str):
                    raise ValueError(f"entry {key}")
                entries[uuid.UUID(key)] = (value["class"], algs)
        except (ValueError, KeyError, TypeError, AttributeError, CryptoError) as exc:
            raise FormatError(ErrorCode.MALFORMED, f"class-algs table: {exc}") from None
        return cls(entries)


def names(algs: Iterable[CoseAlg]) -> str:
    return ", ".join(sorted(ALG_NAMES[a] for a in algs))


def parse_class_alg(
    spec: str, vendor: str, vendor_id: uuid.UUID
) -> tuple[uuid.UUID, str, frozenset[CoseAlg]]:
    """``MODEL:HWREV=ALG[,ALG...]`` -> (class-id, label, algorithms)."""
    klass, eq, alg_list = spec.partition("=")
    model, colon, hw_rev = klass.partition(":")
    if not eq or not colon or not model or not hw_rev or not alg_list.strip():
        raise UsageError(
            ErrorCode.USAGE, f"--class-alg must be MODEL:HWREV=ALG[,ALG], got {spec!r}"
        )
    algs = frozenset(parse_alg_name(a) for a in alg_list.split(",") if a.strip())
    return class_id(vendor_id, model, hw_rev), f"{vendor}/{model}:{hw_rev}", algs


def envelope_algs(data: bytes) -> list[CoseAlg]:
    """The signature algorithm of every authentication block of an envelope."""
    raw = parse_envelope(data, require_tag=True)
    auth = raw.members.get(suit.ENV_AUTH)
    if auth is None:
        return []
    blocks = parse_auth_wrapper(auth).blocks
    return [
        decode_sign1(loads_nested(b, "authentication block"), tag_required=True).alg for b in blocks
    ]
