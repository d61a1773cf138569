"""Signing keys that live inside a PKCS#11 token (an HSM, or SoftHSM2 for tests and demos).

The private key never leaves the token: it is generated there with ``CKA_SENSITIVE`` and
without ``CKA_EXTRACTABLE``, and we only ever ask the token to sign. Keys are addressed with
RFC 7512 URIs (``pkcs11:token=ota;object=release-2026``). A PIN may never be part of a URI
(``pin-value`` is refused): URIs end up in shell history, config files and logs.

PKCS#11 has process-wide state that shapes this module:

* a module (.so) can be initialized only once per process, so loaded modules are cached;
* login state is per token *per process*: logging out one session logs out all of them, and a
  second ``C_Login`` fails with "already logged in" without checking the PIN. So every user of
  a token in this process shares one logged-in session (reference-counted), and a later caller's
  PIN is checked against a keyed hash of the PIN that first logged in successfully;
* a module only sees tokens that existed when it was initialized (SoftHSM2 behaves so), so a
  lookup that finds no token re-initializes the module, but only when nothing in this process
  holds a session on it.

After every signature the result is verified on the host with the exported public key: a token
fault (or a wrong object behind a label) is caught here instead of on a device in the field.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field, fields
from typing import Any

import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass, TokenFlag

from ..errors import CryptoError, ErrorCode, FormatError, KeyStoreError, OtaError, UsageError
from ..fsutil import read_limited
from .algorithms import ALG_KEY_KIND, DEFAULT_ALG, CoseAlg, KeyKind
from .keys import PublicKey, der_ecdsa_to_raw

MODULE_ENV = "OTAGUARD_PKCS11_MODULE"
MODULE_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
)
MAX_URI = 4096
MAX_PIN_FILE = 1024

# DER of the EC parameters we accept (CKA_EC_PARAMS)
P256_PARAMS = bytes.fromhex("06082a8648ce3d030107")  # OID prime256v1
ED25519_PARAMS_OID = bytes.fromhex("06032b6570")  # OID id-Ed25519 (RFC 8410)
ED25519_PARAMS_NAME = b"\x13\x0cedwards25519"  # PrintableString form (PKCS#11 3.0)

# --- RFC 7512 URIs ---------------------------------------------------------------------------

_UNRESERVED = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~"
_PATH_SAFE = frozenset(_UNRESERVED + ":[]@!$'()*+,=")  # pk11-pchar minus pct-encoded
_QUERY_SAFE = frozenset(_UNRESERVED + ":[]@!$'()*+,=/?|")  # pk11-qchar minus pct-encoded
_PCT = re.compile(r"%[0-9A-Fa-f]{2}")

_PATH_ATTRS = {
    "token": "token",
    "manufacturer": "manufacturer",
    "serial": "serial",
    "model": "model",
    "library-manufacturer": "library_manufacturer",
    "library-description": "library_description",
    "library-version": "library_version",
    "object": "object",
    "type": "type",
    "id": "id",
    "slot-manufacturer": "slot_manufacturer",
    "slot-description": "slot_description",
    "slot-id": "slot_id",
}
_QUERY_ATTRS = {
    "module-name": "module_name",
    "module-path": "module_path",
    "pin-source": "pin_source",
}
_OBJECT_TYPES = ("public", "private", "cert", "secret-key", "data")


@dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed ``pkcs11:`` URI. Text values are decoded; ``id`` is raw bytes."""

    token: str | None = None
    manufacturer: str | None = None
    serial: str | None = None
    model: str | None = None
    library_manufacturer: str | None = None
    library_description: str | None = None
    library_version: str | None = None
    object: str | None = None
    type: str | None = None
    id: bytes | None = None
    slot_manufacturer: str | None = None
    slot_description: str | None = None
    slot_id: int | None = None
    module_name: str | None = None
    module_path: str | None = None
    pin_source: str | None = None
    # vendor-specific x-* attributes (RFC 7512 §2.3): kept for round-trips, otherwise ignored
    vendor: tuple[tuple[str, str], ...] = field(default=())
    vendor_query: tuple[tuple[str, str], ...] = field(default=())

    def with_object(self, label: str | None = None, id: bytes | None = None) -> Pkcs11Uri:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        values.update(object=label, id=id)
        return Pkcs11Uri(**values)

    def __str__(self) -> str:
        path: list[str] = []
        for name, attr in _PATH_ATTRS.items():
            value = getattr(self, attr)
            if value is None:
                continue
            if attr == "id":
                path.append(f"id={''.join(f'%{b:02x}' for b in value)}")
            else:
                path.append(f"{name}={_pct_encode(str(value), _PATH_SAFE)}")
        path.extend(f"{k}={_pct_encode(v, _PATH_SAFE)}" for k, v in self.vendor)
        query = [
            f"{name}={_pct_encode(getattr(self, attr), _QUERY_SAFE)}"
            for name, attr in _QUERY_ATTRS.items()
            if getattr(self, attr) is not None
        ]
        query.extend(f"{k}={_pct_encode(v, _QUERY_SAFE)}" for k, v in self.vendor_query)
        text = "pkcs11:" + ";".join(path)
        return text + ("?" + "&".join(query) if query else "")


def _pct_encode(text: str, safe: frozenset[str]) -> str:
    out: list[str] = []
    for ch in text:
        if ch in safe:
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


def _pct_decode(raw: str, safe: frozenset[str], name: str) -> bytes:
    out = bytearray()
    i = 0
    while i < len(raw):
        ch = raw[i]
        if ch == "%":
            if not _PCT.fullmatch(raw, i, i + 3):
                raise FormatError(ErrorCode.MALFORMED, f"PKCS#11 URI: bad percent-escape in {name}")
            out.append(int(raw[i + 1 : i + 3], 16))
            i += 3
            continue
        if ch not in safe:
            raise FormatError(
                ErrorCode.MALFORMED, f"PKCS#11 URI: character {ch!r} must be percent-encoded"
            )
        out.append(ord(ch))
        i += 1
    return bytes(out)


def _utf8(data: bytes, name: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError(ErrorCode.MALFORMED, f"PKCS#11 URI: {name} is not UTF-8") from None


def parse_pkcs11_uri(uri: str) -> Pkcs11Uri:
    """Parse an RFC 7512 URI strictly: unknown attributes and PINs in the URI are refused."""
    if not isinstance(uri, str):
        raise UsageError(ErrorCode.USAGE, "PKCS#11 URI must be a string")
    if len(uri) > MAX_URI:
        raise FormatError(ErrorCode.TOO_LARGE, f"PKCS#11 URI longer than {MAX_URI} characters")
    if uri[:7].lower() != "pkcs11:":
        raise FormatError(ErrorCode.MALFORMED, "not a PKCS#11 URI (must start with 'pkcs11:')")
    rest = uri[7:]
    path_part, sep, query_part = rest.partition("?")
    values: dict[str, Any] = {}
    vendor: list[tuple[str, str]] = []
    vendor_query: list[tuple[str, str]] = []
    for is_query, part, sep_char, known, safe in (
        (False, path_part, ";", _PATH_ATTRS, _PATH_SAFE),
        (True, query_part, "&", _QUERY_ATTRS, _QUERY_SAFE),
    ):
        if not part:
            if is_query and sep:
                raise FormatError(ErrorCode.MALFORMED, "PKCS#11 URI: empty query")
            continue
        for item in part.split(sep_char):
            name, eq, raw = item.partition("=")
            if not eq or not name:
                raise FormatError(ErrorCode.MALFORMED, "PKCS#11 URI: attribute without '='")
            name = name.lower()
            if name == "pin-value":
                raise UsageError(
                    ErrorCode.USAGE,
                    "PKCS#11 URI must not contain pin-value: PINs never go on the command "
                    "line; use OTAGUARD_PKCS11_PIN, a prompt, or pin-source",
                )
            decoded = _pct_decode(raw, safe, name)
            if name.startswith("x-"):
                (vendor_query if is_query else vendor).append((name, _utf8(decoded, name)))
                continue
            if name not in known:
                raise FormatError(ErrorCode.UNSUPPORTED, f"PKCS#11 URI: unknown attribute {name!r}")
            attr = known[name]
            if attr in values:
                raise FormatError(ErrorCode.MALFORMED, f"PKCS#11 URI: {name} given twice")
            if attr == "id":
                values[attr] = decoded
                continue
            text = _utf8(decoded, name)
            if attr == "slot_id":
                if not text.isascii() or not text.isdigit():
                    raise FormatError(ErrorCode.MALFORMED, "PKCS#11 URI: slot-id must be a number")
                values[attr] = int(text)
            elif attr == "type" and text not in _OBJECT_TYPES:
                raise FormatError(ErrorCode.MALFORMED, f"PKCS#11 URI: unknown type {text!r}")
            else:
                values[attr] = text
    return Pkcs11Uri(**values, vendor=tuple(vendor), vendor_query=tuple(vendor_query))


# --- modules, tokens and the shared login -----------------------------------------------------

_REGISTRY_LOCK = threading.RLock()
_PIN_KEY = secrets.token_bytes(32)  # keys the PIN verifier; never leaves this process


def _pin_verifier(pin: str) -> bytes:
    return hmac.new(_PIN_KEY, pin.encode("utf-8"), hashlib.sha256).digest()


class _Login:
    """One logged-in session on one token, shared by everyone in this process."""

    def __init__(self, module: _Module, slot_id: int, token: Any, session: Any, pin: str) -> None:
        self.module = module
        self.slot_id = slot_id
        self.token = token
        self.session = session
        self.verifier = _pin_verifier(pin)
        self.refs = 0
        self.op_lock = threading.Lock()  # a PKCS#11 session runs one operation at a time


class _Module:
    def __init__(self, path: str, lib: Any) -> None:
        self.path = path
        self.lib = lib
        self.logins: dict[int, _Login] = {}


_MODULES: dict[str, _Module] = {}


def default_module(uri: Pkcs11Uri | None = None) -> str:
    """The module to load: the URI's module-path, $OTAGUARD_PKCS11_MODULE, or SoftHSM2."""
    if uri is not None and uri.module_path:
        return uri.module_path
    env = os.environ.get(MODULE_ENV)
    if env:
        return env
    for path in MODULE_CANDIDATES:
        if uri is not None and uri.module_name:
            base = os.path.basename(path)
            if base not in (f"lib{uri.module_name}.so", f"{uri.module_name}.so"):
                continue
        if os.path.exists(path):
            return path
    raise KeyStoreError(
        ErrorCode.HSM, f"no PKCS#11 module found: set {MODULE_ENV} or pass the module path"
    )


def _load_module(path: str) -> _Module:
    real = os.path.realpath(path)
    mod = _MODULES.get(real)
    if mod is not None:
        if not mod.lib.initialized:
            try:
                mod.lib.initialize()
            except pkcs11.PKCS11Error as exc:
                raise _map_error(exc, "initializing the PKCS#11 module") from None
        return mod
    if not os.path.isfile(real):
        raise KeyStoreError(ErrorCode.HSM, f"PKCS#11 module {path} does not exist")
    try:
        lib = pkcs11.lib(real)
    except pkcs11.PKCS11Error as exc:
        raise KeyStoreError(
            ErrorCode.HSM, f"cannot load PKCS#11 module {path}: {type(exc).__name__}"
        ) from None
    mod = _Module(real, lib)
    _MODULES[real] = mod
    return mod


def _map_error(exc: BaseException, what: str) -> OtaError:
    """Translate python-pkcs11 exceptions. Never includes anything the caller passed in."""
    if isinstance(exc, OtaError):
        return exc
    if isinstance(exc, pkcs11.PinIncorrect | pkcs11.PinInvalid | pkcs11.PinLenRange):
        return KeyStoreError(ErrorCode.PIN, f"{what}: wrong PIN")
    if isinstance(exc, pkcs11.PinLocked):
        return KeyStoreError(ErrorCode.PIN, f"{what}: PIN is locked")
    if isinstance(exc, pkcs11.PinExpired):
        return KeyStoreError(ErrorCode.PIN, f"{what}: PIN has expired")
    if isinstance(exc, pkcs11.UserPinNotInitialized):
        return KeyStoreError(ErrorCode.PIN, f"{what}: token user PIN is not initialized")
    if isinstance(exc, pkcs11.NoSuchToken | pkcs11.TokenNotPresent | pkcs11.TokenNotRecognised):
        return KeyStoreError(ErrorCode.TOKEN_NOT_FOUND, f"{what}: token not found")
    if isinstance(exc, pkcs11.NoSuchKey):
        return KeyStoreError(ErrorCode.KEY_NOT_FOUND, f"{what}: key not found")
    if isinstance(exc, pkcs11.MultipleObjectsReturned):
        return UsageError(ErrorCode.USAGE, f"{what}: several objects match; add id= to the URI")
    return KeyStoreError(ErrorCode.HSM, f"{what}: PKCS#11 error {type(exc).__name__}")


def _matches(uri: Pkcs11Uri, mod: _Module, token: Any) -> bool:
    if not token.flags & TokenFlag.TOKEN_INITIALIZED:
        return False
    slot = token.slot
    checks = (
        (uri.token, token.label),
        (uri.manufacturer, token.manufacturer_id),
        (uri.model, token.model),
        (uri.serial, token.serial.decode("ascii", "replace").strip()),
        (uri.slot_id, slot.slot_id),
        (uri.slot_description, slot.slot_description),
        (uri.slot_manufacturer, slot.manufacturer_id),
        (uri.library_manufacturer, mod.lib.manufacturer_id),
        (uri.library_description, mod.lib.library_description),
    )
    return all(want is None or want == have for want, have in checks)


def _find_token(mod: _Module, uri: Pkcs11Uri) -> Any:
    for attempt in (0, 1):
        try:
            found = [t for t in mod.lib.get_tokens() if _matches(uri, mod, t)]
        except pkcs11.PKCS11Error as exc:
            raise _map_error(exc, "listing tokens") from None
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise UsageError(
                ErrorCode.USAGE, f"{len(found)} tokens match the URI; add token= or serial="
            )
        if attempt == 0 and not mod.logins:
            # The module may have been initialized before the token was created.
            try:
                mod.lib.reinitialize()
            except pkcs11.PKCS11Error as exc:
                raise _map_error(exc, "re-initializing the PKCS#11 module") from None
    name = f" {uri.token!r}" if uri.token is not None else ""
    raise KeyStoreError(ErrorCode.TOKEN_NOT_FOUND, f"PKCS#11 token{name} not found")


def _resolve_pin(uri: Pkcs11Uri, pin: str | None) -> str:
    if pin is None and uri.pin_source:
        source = uri.pin_source
        if source.startswith("file:"):
            source = source[5:]
            if source.startswith("//"):  # file:///path
                source = source[2:]
        if source.startswith("|"):
            raise UsageError(ErrorCode.USAGE, "pin-source programs are not supported")
        try:
            pin = read_limited(source, MAX_PIN_FILE).decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError:
            raise KeyStoreError(ErrorCode.PIN, "pin-source file is not UTF-8") from None
        except OtaError as exc:
            raise KeyStoreError(
                ErrorCode.PIN, f"cannot read pin-source: {exc.code.value}"
            ) from None
    if not pin:
        raise KeyStoreError(ErrorCode.PIN, "a token PIN is required")
    return pin


def _acquire(uri: Pkcs11Uri, pin: str, module: str | None) -> _Login:
    with _REGISTRY_LOCK:
        mod = _load_module(module or default_module(uri))
        token = _find_token(mod, uri)
        slot_id = int(token.slot.slot_id)
        login = mod.logins.get(slot_id)
        if login is not None:
            if not hmac.compare_digest(login.verifier, _pin_verifier(pin)):
                raise KeyStoreError(ErrorCode.PIN, "wrong PIN")
        else:
            try:
                session = token.open(rw=True, user_pin=pin)
            except pkcs11.UserAlreadyLoggedIn:
                raise KeyStoreError(
                    ErrorCode.HSM, "token is already logged in by other code in this process"
                ) from None
            except pkcs11.PKCS11Error as exc:
                raise _map_error(exc, "logging in to the token") from None
            login = _Login(mod, slot_id, token, session, pin)
            mod.logins[slot_id] = login
        login.refs += 1
        return login


def _release(login: _Login) -> None:
    with _REGISTRY_LOCK:
        login.refs -= 1
        if login.refs > 0:
            return
        if login.module.logins.get(login.slot_id) is login:
            del login.module.logins[login.slot_id]
        with suppress(pkcs11.PKCS11Error):
            login.session.close()  # logs out too


def _as_uri(uri_or_token: str | Pkcs11Uri) -> Pkcs11Uri:
    if isinstance(uri_or_token, Pkcs11Uri):
        return uri_or_token
    if uri_or_token[:7].lower() == "pkcs11:":
        return parse_pkcs11_uri(uri_or_token)
    return Pkcs11Uri(token=uri_or_token)


@contextmanager
def token_session(
    uri_or_token: str | Pkcs11Uri, *, pin: str | None = None, module: str | None = None
) -> Iterator[Any]:
    """The process's logged-in ``pkcs11.Session`` for a token (for tools and tests).

    Do not call ``close()`` on it: that would log out every user of the token.
    """
    uri = _as_uri(uri_or_token)
    login = _acquire(uri, _resolve_pin(uri, pin), module)
    try:
        with login.op_lock:
            yield login.session
    finally:
        _release(login)


# --- key objects -------------------------------------------------------------------------------


def _decode_ec_point(value: bytes) -> bytes:
    """CKA_EC_POINT is a DER OCTET STRING around the point; some tokens return it bare."""
    if len(value) in (32, 65):
        return value
    if len(value) >= 2 and value[0] == 0x04 and value[1] == len(value) - 2:
        return value[2:]
    raise CryptoError(ErrorCode.KEY_FORMAT, "cannot decode CKA_EC_POINT")


def _key_kind(obj: Any) -> KeyKind:
    try:
        key_type = obj[Attribute.KEY_TYPE]
        params = (
            bytes(obj[Attribute.EC_PARAMS]) if key_type in (KeyType.EC, KeyType.EC_EDWARDS) else b""
        )
    except pkcs11.PKCS11Error as exc:
        raise _map_error(exc, "reading key attributes") from None
    if key_type == KeyType.EC_EDWARDS and params in (ED25519_PARAMS_OID, ED25519_PARAMS_NAME):
        return "ed25519"
    if key_type == KeyType.EC and params == P256_PARAMS:
        return "p256"
    if key_type == KeyType.RSA:
        raise CryptoError(ErrorCode.ALGORITHM, "RSA keys are refused: use Ed25519 or P-256")
    raise CryptoError(ErrorCode.ALGORITHM, "token key is not Ed25519 or P-256")


def _public_from_object(obj: Any) -> PublicKey:
    kind = _key_kind(obj)
    try:
        point = bytes(obj[Attribute.EC_POINT])
    except pkcs11.PKCS11Error as exc:
        raise _map_error(exc, "reading the public key") from None
    return PublicKey.from_raw(kind, _decode_ec_point(point))


def _find_object(session: Any, uri: Pkcs11Uri, cls: ObjectClass) -> Any:
    if uri.object is None and uri.id is None:
        raise UsageError(ErrorCode.USAGE, "PKCS#11 URI must name the key (object= or id=)")
    attrs: dict[Attribute, Any] = {Attribute.CLASS: cls}
    if uri.object is not None:
        attrs[Attribute.LABEL] = uri.object
    if uri.id is not None:
        attrs[Attribute.ID] = uri.id
    try:
        found = list(session.get_objects(attrs))
    except pkcs11.PKCS11Error as exc:
        raise _map_error(exc, "searching the token") from None
    what = "private key" if cls == ObjectClass.PRIVATE_KEY else "public key"
    if not found:
        raise KeyStoreError(ErrorCode.KEY_NOT_FOUND, f"{what} {uri.object or ''} not on the token")
    if len(found) > 1:
        raise UsageError(ErrorCode.USAGE, f"{len(found)} objects match; add id= to the URI")
    return found[0]


def _load_pair(session: Any, uri: Pkcs11Uri) -> tuple[Any, PublicKey]:
    """The private key named by ``uri`` and its public key (same label, else same CKA_ID)."""
    try:
        key = _find_object(session, uri, ObjectClass.PRIVATE_KEY)
        kind = _key_kind(key)
        try:
            public = _public_from_object(_find_object(session, uri, ObjectClass.PUBLIC_KEY))
        except KeyStoreError as exc:
            key_id = bytes(key[Attribute.ID])
            if exc.code != ErrorCode.KEY_NOT_FOUND or not key_id:
                raise
            public = _public_from_object(
                _find_object(session, Pkcs11Uri(id=key_id), ObjectClass.PUBLIC_KEY)
            )
    except pkcs11.PKCS11Error as exc:
        raise _map_error(exc, "opening the key") from None
    if public.kind != kind:
        raise CryptoError(ErrorCode.ALGORITHM, "public and private key types differ")
    return key, public


# --- the signer --------------------------------------------------------------------------------


class Pkcs11Signer:
    """A :class:`~otaguard.crypto.cose.Signer` whose private key stays inside a token."""

    def __init__(self, login: _Login, key: Any, public: PublicKey, alg: CoseAlg, uri: str) -> None:
        self._login = login
        self._key = key
        self._public = public
        self._alg = alg
        self.uri = uri
        self._finalizer = weakref.finalize(self, _release, login)

    @classmethod
    def open(
        cls,
        uri: str | Pkcs11Uri,
        *,
        pin: str | None = None,
        module: str | None = None,
        alg: CoseAlg | None = None,
    ) -> Pkcs11Signer:
        parsed = _as_uri(uri)
        if parsed.type not in (None, "private"):
            raise UsageError(ErrorCode.USAGE, "a signing key URI must have type=private or none")
        login = _acquire(parsed, _resolve_pin(parsed, pin), module)
        try:
            with login.op_lock:
                key, public = _load_pair(login.session, parsed)
            kind = public.kind
            chosen = alg if alg is not None else DEFAULT_ALG[kind]
            if ALG_KEY_KIND[chosen] != kind:
                raise CryptoError(ErrorCode.ALGORITHM, f"{chosen.name} cannot be used with {kind}")
        except BaseException:
            _release(login)
            raise
        return cls(login, key, public, chosen, str(parsed))

    @property
    def public_key(self) -> PublicKey:
        return self._public

    @property
    def alg(self) -> CoseAlg:
        return self._alg

    def sign(self, data: bytes) -> bytes:
        if not self._finalizer.alive:
            raise KeyStoreError(ErrorCode.HSM, "signer is closed")
        try:
            with self._login.op_lock:
                if self._public.kind == "ed25519":
                    sig = bytes(self._key.sign(data, mechanism=Mechanism.EDDSA))
                else:
                    digest = hashlib.sha256(data).digest()
                    sig = bytes(self._key.sign(digest, mechanism=Mechanism.ECDSA))
        except pkcs11.PKCS11Error as exc:
            raise _map_error(exc, "signing in the token") from None
        if self._public.kind == "p256" and len(sig) != 64:
            sig = der_ecdsa_to_raw(sig)
        try:
            self._public.verify(self._alg, sig, data)
        except CryptoError:
            raise KeyStoreError(
                ErrorCode.HSM, "token returned a signature that does not verify"
            ) from None
        return sig

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> Pkcs11Signer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Pkcs11Signer({self.uri}, {self._public!r})"


# --- key management ----------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenKey:
    label: str
    id: bytes
    kind: KeyKind
    public_key: PublicKey
    uri: str


def generate_keypair(
    uri_or_token_label: str | Pkcs11Uri,
    object_label: str,
    kind: KeyKind,
    *,
    pin: str | None = None,
    module: str | None = None,
) -> PublicKey:
    """Generate a key pair INSIDE the token; the private half is sensitive and unextractable.

    CKA_ID of both objects is set to the key's otaguard key id, so ``id=`` URIs match ``kid``.
    """
    if kind == "ed25519":
        key_type, mech, params = (
            KeyType.EC_EDWARDS,
            Mechanism.EC_EDWARDS_KEY_PAIR_GEN,
            ED25519_PARAMS_OID,
        )
    elif kind == "p256":
        key_type, mech, params = KeyType.EC, Mechanism.EC_KEY_PAIR_GEN, P256_PARAMS
    else:
        raise CryptoError(ErrorCode.ALGORITHM, f"key kind {kind!r} refused (ed25519 or p256 only)")
    if not object_label:
        raise UsageError(ErrorCode.USAGE, "an object label is required")
    uri = _as_uri(uri_or_token_label)
    with token_session(uri, pin=pin, module=module) as session:
        try:
            if list(session.get_objects({Attribute.LABEL: object_label})):
                raise KeyStoreError(
                    ErrorCode.EXISTS, f"an object labelled {object_label!r} already exists"
                )
            temp_id = secrets.token_bytes(16)
            pub, priv = session.generate_keypair(
                key_type,
                mechanism=mech,
                store=True,
                label=object_label,
                id=temp_id,
                public_template={
                    Attribute.EC_PARAMS: params,
                    Attribute.TOKEN: True,
                    Attribute.VERIFY: True,
                    Attribute.PRIVATE: False,
                },
                private_template={
                    Attribute.TOKEN: True,
                    Attribute.PRIVATE: True,
                    Attribute.SENSITIVE: True,
                    Attribute.EXTRACTABLE: False,
                    Attribute.SIGN: True,
                },
            )
            public = _public_from_object(pub)
            for obj in (pub, priv):
                with suppress(pkcs11.PKCS11Error):
                    obj[Attribute.ID] = public.key_id
            if priv[Attribute.EXTRACTABLE] or not priv[Attribute.SENSITIVE]:
                with suppress(pkcs11.PKCS11Error):
                    priv.destroy()
                    pub.destroy()
                raise KeyStoreError(ErrorCode.HSM, "token did not honour sensitive/unextractable")
        except pkcs11.PKCS11Error as exc:
            raise _map_error(exc, "generating a key pair") from None
    return public


def export_public_key(
    uri: str | Pkcs11Uri, *, pin: str | None = None, module: str | None = None
) -> PublicKey:
    parsed = _as_uri(uri)
    with token_session(parsed, pin=pin, module=module) as session:
        return _public_from_object(_find_object(session, parsed, ObjectClass.PUBLIC_KEY))


def list_keys(
    uri_or_token: str | Pkcs11Uri, *, pin: str | None = None, module: str | None = None
) -> list[TokenKey]:
    """Ed25519/P-256 key pairs on the token (other key types are skipped)."""
    uri = _as_uri(uri_or_token)
    out: list[TokenKey] = []
    with token_session(uri, pin=pin, module=module) as session:
        try:
            objs = list(session.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY}))
            for obj in objs:
                try:
                    public = _public_from_object(obj)
                except CryptoError:
                    continue
                label = str(obj[Attribute.LABEL])
                key_id = bytes(obj[Attribute.ID])
                ref = Pkcs11Uri(token=uri.token, object=label, id=key_id or None)
                out.append(TokenKey(label, key_id, public.kind, public, str(ref)))
        except pkcs11.PKCS11Error as exc:
            raise _map_error(exc, "listing keys") from None
    return sorted(out, key=lambda k: (k.label, k.id))
