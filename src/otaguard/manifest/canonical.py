"""The canonical route: verify an envelope that is byte for byte what otaguard itself writes.

Every envelope the signing service produces is canonical: one encoding per content. For those,
the general strict pipeline (:mod:`.verify`: a byte-level walk of every nested CBOR document,
then the profile checks) does far more work than the signature check it guards. This route
reads the envelope as the one layout otaguard writes (:mod:`.profile` is its encoder), item by
item in place with :mod:`otaguard.cborread`: fixed bytes where the layout has them, a
shortest-form value of the one allowed type where it has a value, and every nested document
ending exactly where its byte string does. Bytes read that way to their end are the canonical
encoding of the values read, so every property the strict walk checks (minimal heads, definite
lengths, no duplicate or unexpected members, types, key order) holds by construction;
tests/test_manifest_canonical.py checks that whatever this route accepts is exactly what the
encoder writes for the values it returns.

It keeps the order that matters (docs/threat-model.md): the outer layers (envelope,
authentication wrapper, SUIT_Digest, COSE_Sign1 and its protected header) are read and the
digest and signatures verified before a byte of the manifest body is looked at.

It never rejects anything. Any doubt (a layer that is not canonical, a check that fails)
returns ``None`` and the strict pipeline decides, so the error a caller sees, and its code,
always come from one place; tests/test_manifest_canonical.py checks that both routes agree.
"""

from __future__ import annotations

import hmac
import uuid

from .. import cborenc as enc
from .. import cborread as rd
from ..crypto.algorithms import HASH_SIZES, CoseAlg, HashAlg, digest_bytes
from ..errors import OtaError
from ..trust.model import KeyResolver, Role, TrustedKey
from . import suit
from .envelope import MAX_AUTH_BLOCKS
from .model import MAX_TEXT_ENTRIES, MAX_TEXT_VALUE, MAX_URI, DeltaInfo, ManifestInfo
from .profile import (  # the encoder's layout, read back here
    _COMMON_HEAD,
    _COMPONENT_KEY,
    _COND_REQUIRED,
    _COND_USE_BEFORE,
    _COND_VERSION,
    _DELTA_HEAD,
    _IMAGE_MATCH,
    _INSTALL_TAIL,
    _M_SET_VERSION,
    _M_VALIDATE,
    _M_VERSION,
    _OVERRIDE,
    _P_CLASS,
    _P_DELTA,
    _P_DIGEST,
    _P_SIZE,
    _P_URI,
    _P_USE_BEFORE,
    _P_VENDOR,
    _P_VERSION,
    _PAIR,
    _SET_PARAMETERS,
    _TEXT_COMPONENT_REV,
    _TEXT_HEAD,
    _TEXT_TOP_REV,
    _VALIDATE_HEAD,
    _VERSION_GE,
    TEXT_COMPONENT,
    TEXT_TOP,
)
from .version import MAX_COMPONENT, MAX_COMPONENTS

# Everything a malformed or merely unexpected input can raise on this route; all mean "ask
# the strict route". Programming errors (AttributeError, NameError...) are deliberately not
# here: tests would see them. rd.Mismatch and UnicodeDecodeError are ValueErrors; a read past
# the end of the buffer is an IndexError (a LookupError).
_DOUBT = (OtaError, LookupError, TypeError, ValueError, OverflowError)

_ENVELOPE_HEAD = (
    enc.head(6, suit.TAG_ENVELOPE) + enc.head(5, 2) + enc.uint(suit.ENV_AUTH)
)  # followed by bstr(auth), then:
_MANIFEST_KEY = enc.uint(suit.ENV_MANIFEST)
_SIGN1_HEAD = enc.head(6, suit.TAG_SIGN1) + enc.head(4, 4)
_KID_KEY = enc.head(5, 1) + enc.uint(4)  # unprotected header: {kid: bstr}
_PROTECTED_ALG = enc.head(5, 1) + enc.uint(1)  # protected header: {alg: int}
_SIG_STRUCTURE = enc.head(4, 4) + enc.tstr("Signature1")
_EMPTY_AAD = enc.bstr(b"")
_COSE_ALGS = {int(a): a for a in CoseAlg}
_HASH_ALGS = {int(a): a for a in HashAlg}
_M_VERSION_SEQUENCE = _M_VERSION + enc.uint(suit.MAN_SEQUENCE)  # version 1, then the key 2
_M_COMMON = enc.uint(suit.MAN_COMMON)
_M_INSTALL = enc.uint(suit.MAN_INSTALL)
_M_TEXT = enc.uint(suit.MAN_TEXT)
# The conditions that close the shared sequence and the sequence's item count (override and
# its map, then a condition and its reporting policy each), by (use-before, min version).
_CONDITIONS = {
    (False, False): (_COND_REQUIRED, 2 + 2 * 2),
    (True, False): (_COND_REQUIRED + _COND_USE_BEFORE, 2 + 2 * 3),
    (False, True): (_COND_REQUIRED + _COND_VERSION, 2 + 2 * 3),
    (True, True): (_COND_REQUIRED + _COND_USE_BEFORE + _COND_VERSION, 2 + 2 * 4),
}
_VERSION_PREFIX = _PAIR + _VERSION_GE  # [>=, version]


class Canonical:
    """What the canonical route verified: the same fields the strict route returns."""

    __slots__ = ("digest", "info", "signers")

    def __init__(self, info: ManifestInfo, digest: bytes, signers: tuple[TrustedKey, ...]):
        self.info = info
        self.digest = digest
        self.signers = signers


def verify(data: bytes, resolver: KeyResolver, now: int | None) -> Canonical | None:
    """Verify a canonical otaguard envelope; ``None`` if the strict route must decide."""
    try:
        return _verify(data, resolver, now)
    except _DOUBT:
        return None


def decode_pinned(data: bytes) -> Canonical | None:
    """As :func:`verify` minus the signatures, for an envelope pinned by the digest of its
    bytes (the bootloader's confirmed slot, see verify.decode_pinned); ``signers`` is empty."""
    try:
        return _verify(data, None, None)
    except _DOUBT:
        return None


def _verify(data: bytes, resolver: KeyResolver | None, now: int | None) -> Canonical | None:
    # envelope: 107({2: bstr .cbor auth, 3: bstr .cbor manifest})
    auth_start, auth_end = rd.bstr(data, rd.expect(data, 0, _ENVELOPE_HEAD))
    manifest_head = rd.expect(data, auth_end, _MANIFEST_KEY)
    manifest_start, manifest_end = rd.bstr(data, manifest_head)
    rd.at_end(manifest_end, len(data))

    # authentication wrapper: [bstr .cbor SUIT_Digest, bstr .cbor COSE_Sign1 ...]
    n_items, pos = rd.head(data, auth_start, 4)
    if not 2 <= n_items <= 1 + MAX_AUTH_BLOCKS:
        return None
    payload_head = pos
    payload_start, payload_end = rd.bstr(data, pos)
    alg_number, pos = rd.integer(data, rd.expect(data, payload_start, _PAIR))
    alg = _HASH_ALGS[alg_number]
    digest_start, digest_end = rd.bstr(data, pos)
    rd.at_end(digest_end, payload_end)
    digest = data[digest_start:digest_end]
    if len(digest) != HASH_SIZES[alg]:
        return None
    if not hmac.compare_digest(digest_bytes(data[manifest_head:], alg), digest):
        return None

    # The signatures cover the payload as its byte string (head included), as received.
    signed_payload = data[payload_head:payload_end]
    signers: dict[bytes, TrustedKey] = {}
    pos = payload_end
    for _ in range(n_items - 1):
        block_start, pos = rd.bstr(data, pos)
        if resolver is not None:  # a pinned envelope's blocks are covered by the pin
            trusted = _signature(data, block_start, pos, signed_payload, resolver, now)
            if trusted is not None:
                signers.setdefault(trusted.key.raw, trusted)  # one key counts once
    rd.at_end(pos, auth_end)
    if resolver is not None and len(signers) < max(1, resolver.threshold):
        return None

    # Only now, authenticated, is the manifest body read.
    info = _read_manifest(data, manifest_start, manifest_end)
    found = tuple(signers.values())
    for signer in found:
        signer.check_scope(info.vendor_id, info.class_id)
    return Canonical(info, digest, found)


def _read_sign1(data: bytes, start: int, end: int) -> tuple[int, bytes, bytes, bytes]:
    """One COSE_Sign1 as our signer writes it: 18([h'{1: alg}', {4: kid}, nil, sig]).

    Returns the alg number, the protected header as its byte string (head included, as the
    Sig_structure takes it), the kid and the signature."""
    protected_head = rd.expect(data, start, _SIGN1_HEAD)
    protected_start, protected_end = rd.bstr(data, protected_head)
    alg_number, pos = rd.integer(data, rd.expect(data, protected_start, _PROTECTED_ALG))
    rd.at_end(pos, protected_end)
    kid_start, kid_end = rd.bstr(data, rd.expect(data, protected_end, _KID_KEY))
    sig_start, sig_end = rd.bstr(data, rd.expect(data, kid_end, enc.NULL))
    rd.at_end(sig_end, end)
    protected = data[protected_head:protected_end]
    return alg_number, protected, data[kid_start:kid_end], data[sig_start:sig_end]


def _signature(
    data: bytes,
    start: int,
    end: int,
    signed_payload: bytes,
    resolver: KeyResolver,
    now: int | None,
) -> TrustedKey | None:
    alg_number, protected, kid, signature = _read_sign1(data, start, end)
    alg = _COSE_ALGS[alg_number]
    try:
        trusted = resolver.resolve(kid, alg, Role.FIRMWARE, now)
        tbs = _SIG_STRUCTURE + protected + _EMPTY_AAD + signed_payload
        trusted.key.verify(alg, signature, tbs)
    except OtaError:
        return None  # as in the strict route, a block that fails does not count
    return trusted


def manifest_info(raw: bytes) -> ManifestInfo | None:
    """The profile fields of a canonical manifest, or ``None`` if ``raw`` is anything else."""
    try:
        return _read_manifest(raw, 0, len(raw))
    except _DOUBT:
        return None


def _read_manifest(data: bytes, start: int, end: int) -> ManifestInfo:
    """Read ``data[start:end]`` as the SUIT_Manifest :func:`.profile.encode_manifest` writes,
    in its order: version, sequence, common, set-version, validate, [install], [text]."""
    entries, pos = rd.head(data, start, 5)
    sequence, pos = rd.uint(data, rd.expect(data, pos, _M_VERSION_SEQUENCE))

    # common: {components: [[h'00']], shared-sequence: bstr .cbor [override, {params}, conds]}
    common_start, common_end = rd.bstr(data, rd.expect(data, pos, _M_COMMON))
    shared_start, shared_end = rd.bstr(data, rd.expect(data, common_start, _COMMON_HEAD))
    rd.at_end(shared_end, common_end)
    n_shared, pos = rd.head(data, shared_start, 4)
    n_params, pos = rd.head(data, rd.expect(data, pos, _OVERRIDE), 5)
    pos = rd.expect(data, pos, _P_VENDOR)
    vendor = data[pos : pos + 16]
    pos = rd.expect(data, pos + 16, _P_CLASS)
    klass = data[pos : pos + 16]
    item_start, item_end = rd.bstr(data, rd.expect(data, pos + 16, _P_DIGEST))
    alg_number, pos = rd.integer(data, rd.expect(data, item_start, _PAIR))
    digest_alg = _HASH_ALGS[alg_number]
    size = HASH_SIZES[digest_alg]
    digest_start, pos = rd.bstr(data, pos)
    rd.at_end(pos, item_end)
    image_digest = data[digest_start:pos]
    if len(image_digest) != size:
        raise rd.Mismatch("image digest length")
    expires = None
    if data.startswith(_P_USE_BEFORE, pos):
        expires, pos = rd.uint(data, pos + len(_P_USE_BEFORE))
    image_size, pos = rd.uint(data, rd.expect(data, pos, _P_SIZE))
    min_version = None
    if data.startswith(_P_VERSION, pos):
        item_start, item_end = rd.bstr(data, pos + len(_P_VERSION))
        min_version, pos = _version(data, rd.expect(data, item_start, _VERSION_PREFIX))
        rd.at_end(pos, item_end)
    conditions, n_items = _CONDITIONS[expires is not None, min_version is not None]
    rd.at_end(rd.expect(data, pos, conditions), shared_end)
    if n_shared != n_items:
        raise rd.Mismatch("shared sequence length")
    if n_params != 4 + (expires is not None) + (min_version is not None):
        raise rd.Mismatch("parameter count")

    item_start, item_end = rd.bstr(data, rd.expect(data, common_end, _M_SET_VERSION))
    version, pos = _version(data, item_start)
    rd.at_end(pos, item_end)
    # validate: [override-parameters, {counter}, image-match, rep]
    item_start, item_end = rd.bstr(data, rd.expect(data, item_end, _M_VALIDATE))
    counter, pos = rd.uint(data, rd.expect(data, item_start, _VALIDATE_HEAD))
    rd.at_end(rd.expect(data, pos, _IMAGE_MATCH), item_end)
    pos = item_end
    uri = None
    delta = None
    if data.startswith(_M_INSTALL, pos):
        # install: [set-parameters, {? uri, ? delta}, (fetch, rep, image-match, rep) iff uri]
        item_start, item_end = rd.bstr(data, pos + len(_M_INSTALL))
        n_install, pos = rd.head(data, item_start, 4)
        n_map, pos = rd.head(data, rd.expect(data, pos, _SET_PARAMETERS), 5)
        if data.startswith(_P_URI, pos):
            uri, pos = rd.tstr(data, pos + len(_P_URI))
            _check_uri(uri)
        if data.startswith(_P_DELTA, pos):
            delta, pos = _delta(data, pos + len(_P_DELTA), size)
        if n_map != (uri is not None) + (delta is not None) or not n_map:
            raise rd.Mismatch("install parameter count")
        if uri is not None:
            pos = rd.expect(data, pos, _INSTALL_TAIL)
        if n_install != (6 if uri is not None else 2):
            raise rd.Mismatch("install length")
        rd.at_end(pos, item_end)
    text: dict[str, str] = {}
    if data.startswith(_M_TEXT, pos):
        item_start, item_end = rd.bstr(data, pos + len(_M_TEXT))
        text = _text(data, item_start, item_end)
        pos = item_end
    rd.at_end(pos, end)
    if entries != 5 + (uri is not None or delta is not None) + bool(text):
        raise rd.Mismatch("manifest entry count")
    return ManifestInfo(
        sequence,
        uuid.UUID(bytes=vendor),
        uuid.UUID(bytes=klass),
        digest_alg,
        image_digest,
        image_size,
        version,
        min_version,
        counter,
        expires,
        uri,
        text,
        delta,
    )


def _version(data: bytes, pos: int) -> tuple[str, int]:
    """A version as the profile writes it: an array of 1..8 components, each < 2**32."""
    n, pos = rd.head(data, pos, 4)
    if not 1 <= n <= MAX_COMPONENTS:
        raise rd.Mismatch("version length")
    small = data[pos : pos + n]
    if len(small) == n and max(small) < 24:  # every component in its one-byte head
        return ".".join(map(str, small)), pos + n
    parts = []
    for _ in range(n):
        part, pos = rd.uint(data, pos)
        if part > MAX_COMPONENT:
            raise rd.Mismatch("version component")
        parts.append(str(part))
    return ".".join(parts), pos


def _check_uri(uri: str) -> None:
    if not uri or len(uri.encode()) > MAX_URI:
        raise rd.Mismatch("uri length")


def _delta(data: bytes, pos: int, size: int) -> tuple[DeltaInfo, int]:
    """The delta parameter: bstr .cbor [base digest, patch digest, patch size, uri / nil]."""
    start, end = rd.bstr(data, pos)
    base_start, pos = rd.bstr(data, rd.expect(data, start, _DELTA_HEAD))
    base = data[base_start:pos]
    patch_start, pos = rd.bstr(data, pos)
    patch = data[patch_start:pos]
    patch_size, pos = rd.uint(data, pos)
    uri = None
    if data.startswith(enc.NULL, pos):
        pos += 1
    else:
        uri, pos = rd.tstr(data, pos)
        _check_uri(uri)
    rd.at_end(pos, end)
    if len(base) != size or len(patch) != size:
        raise rd.Mismatch("delta digest length")
    return DeltaInfo(base, patch, patch_size, uri), end


def _text(data: bytes, start: int, end: int) -> dict[str, str]:
    """SUIT_Text_Map for the one language :func:`.profile.encode_text` writes: labelled
    manifest texts, then the component map, each map's keys in core deterministic order
    (bytewise order of the encoded keys, no repeats)."""
    n, pos = rd.head(data, rd.expect(data, start, _TEXT_HEAD), 5)
    text: dict[str, str] = {}
    previous = b""  # the last key read, encoded: keys sort bytewise
    for _ in range(n):
        key_start = pos
        if data.startswith(_COMPONENT_KEY, pos):
            pos += len(_COMPONENT_KEY)
            key = _COMPONENT_KEY
            if key <= previous:
                raise rd.Mismatch("text keys out of canonical order")
            previous = key
            pos = _component_text(data, pos, text)
        else:
            label, pos = rd.uint(data, pos)
            key = data[key_start:pos]
            if key <= previous:
                raise rd.Mismatch("text keys out of canonical order")
            previous = key
            text[_TEXT_TOP_REV[label]], pos = _text_value(data, pos)
    rd.at_end(pos, end)
    if not text or len(text) > MAX_TEXT_ENTRIES:
        raise rd.Mismatch("text entry count")
    return text


def _component_text(data: bytes, pos: int, text: dict[str, str]) -> int:
    """The component's text map, into ``text``: labelled entries, then text-keyed extensions
    (which may not spell a label's name: the encoder would have used the label)."""
    count, pos = rd.head(data, pos, 5)
    if not count:
        raise rd.Mismatch("empty component text")
    previous = b""
    for _ in range(count):
        key_start = pos
        if data[pos] >> 5 == 3:
            name, pos = rd.tstr(data, pos)
            if not name or name in TEXT_COMPONENT or name in TEXT_TOP:
                raise rd.Mismatch("component text key")
        else:
            label, pos = rd.uint(data, pos)
            name = _TEXT_COMPONENT_REV[label]
        key = data[key_start:pos]
        if key <= previous:
            raise rd.Mismatch("component text keys out of canonical order")
        previous = key
        text[name], pos = _text_value(data, pos)
    return pos


def _text_value(data: bytes, pos: int) -> tuple[str, int]:
    value, end = rd.tstr(data, pos)
    # end - pos counts the head too, so within the limit it bounds the UTF-8 length
    if end - pos > MAX_TEXT_VALUE and len(value.encode()) > MAX_TEXT_VALUE:
        raise rd.Mismatch("text value too long")
    return value, end
