"""mTLS and CSRs with the TPM-held identity key (docs/device-linux.md, "TPM 2.0").

Python's ``ssl`` can only use a private key that OpenSSL can use. Debian 12's route for TPM
keys, the ``tpm2-openssl`` provider, does load a "TSS2 PRIVATE KEY" into an ``SSLContext``,
but OpenSSL 3.0's ``EVP_DigestSignInit`` then picks the *default* provider's ECDSA (it sorts
first), exports only the public key to it and the handshake fails ("missing private key",
``SSL: EVP lib``). The documented fix, ``default_properties = ?provider=tpm2``, moves *every*
digest and cipher of the process into the TPM: the TLS 1.3 key schedule then runs out of TPM
object memory, server-certificate checks fail, and ``hashlib`` (image hashing) would go
through the TPM too. Measured; see docs/architecture.md.

What works, and is what this module does: an OpenSSL ``EC_KEY`` holding the identity key's
*public* part with an ``EC_KEY_METHOD`` whose sign operation calls ``TPM2_Sign`` (tpm2-pytss)
on the digest OpenSSL hands it. Such a key is "foreign" to OpenSSL 3.0, so its signatures go
through that method and nowhere else; it is installed into the ``SSLContext`` with
``SSL_CTX_use_PrivateKey``. The private key never exists outside the TPM.
"""

from __future__ import annotations

import ctypes
import ssl
from ctypes import CFUNCTYPE, POINTER, c_char_p, c_int, c_long, c_ubyte, c_uint, c_void_p
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.x509.oid import NameOID
from tpm2_pytss import TSS2_Exception
from tpm2_pytss.constants import TPM2_ALG, TPM2_RH, TPM2_ST
from tpm2_pytss.tsskey import TSSPrivKey
from tpm2_pytss.types import TPM2B_DIGEST, TPMT_SIG_SCHEME, TPMT_TK_HASHCHECK

from ...errors import DeviceError, ErrorCode
from ..https_transport import KeyLoader
from ..renewal import KeyMaker, NewKey
from .tpm import Tpm, create_identity_key, is_tpm_key

EVP_PKEY_EC = 408  # NID_X9_62_id_ecPublicKey
MAX_LOADED_KEYS = 2


def blob_spki(pem: bytes) -> bytes:
    """The SubjectPublicKeyInfo of a TPM key blob, read from its public part (no TPM needed)."""
    try:
        pub = serialization.load_pem_public_key(TSSPrivKey.from_pem(pem).public.to_pem())
    except Exception as exc:  # an ASN.1, PEM or TPM-structure error from the parsers
        raise DeviceError(ErrorCode.MALFORMED, f"TPM key blob unreadable: {exc}") from None
    return pub.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class TpmKey:
    """The identity key loaded into the TPM: its public key, and signatures over digests."""

    def __init__(self, tpm: Tpm, pem: bytes) -> None:
        self.tpm = tpm
        try:
            self._key = TSSPrivKey.from_pem(pem)
        except Exception as exc:  # an ASN.1 or PEM error from the TSS key parser
            raise DeviceError(ErrorCode.MALFORMED, f"TPM key blob unreadable: {exc}") from None
        with tpm.call("loading the identity key"):
            self.handle = self._key.load(tpm.ectx)
        pub = serialization.load_pem_public_key(self._key.public.to_pem())
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise DeviceError(ErrorCode.UNSUPPORTED, "TPM identity key is not an EC key")
        self.public_key = pub

    def close(self) -> None:
        """Unload the key. (The kernel's resource manager does this when the process ends; a
        TPM reached without one, such as swtpm over TCP, keeps it until told.)"""
        if self.handle is not None:
            handle, self.handle = self.handle, None
            with self.tpm.call("unloading the identity key"):
                self.tpm.ectx.flush_context(handle)

    def spki_der(self) -> bytes:
        return self.public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def sign_digest(self, digest: bytes) -> bytes:
        """ECDSA over ``digest`` inside the TPM; DER ``ECDSA-Sig-Value``."""
        scheme = TPMT_SIG_SCHEME(scheme=TPM2_ALG.ECDSA)
        scheme.details.any.hashAlg = {32: TPM2_ALG.SHA256, 48: TPM2_ALG.SHA384}.get(
            len(digest), TPM2_ALG.SHA256
        )
        ticket = TPMT_TK_HASHCHECK(tag=TPM2_ST.HASHCHECK, hierarchy=TPM2_RH.NULL)
        if self.handle is None:
            raise DeviceError(ErrorCode.STATE, "the identity key was unloaded")
        with self.tpm.call("signing with the identity key"):
            sig = self.tpm.ectx.sign(self.handle, TPM2B_DIGEST(digest), scheme, ticket)
        r = int.from_bytes(bytes(sig.signature.ecdsa.signatureR), "big")
        s = int.from_bytes(bytes(sig.signature.ecdsa.signatureS), "big")
        return encode_dss_signature(r, s)


# --- the OpenSSL side ------------------------------------------------------------------------
_SIGN = CFUNCTYPE(
    c_int, c_int, POINTER(c_ubyte), c_int, POINTER(c_ubyte), POINTER(c_uint), c_void_p, c_void_p,
    c_void_p,
)  # fmt: skip
_SIGN_SETUP = CFUNCTYPE(c_int, c_void_p, c_void_p, c_void_p, c_void_p)
_SIGN_SIG = CFUNCTYPE(c_void_p, POINTER(c_ubyte), c_int, c_void_p, c_void_p, c_void_p)


def _fn(lib: Any, name: str, res: Any, *args: Any) -> Any:
    f = getattr(lib, name)
    f.restype = res
    f.argtypes = list(args)
    return f


class _OpenSsl:
    """The libcrypto/libssl that Python's ``ssl`` module itself uses (checked by version)."""

    def __init__(self) -> None:
        try:
            crypto = ctypes.CDLL("libcrypto.so.3")
            libssl = ctypes.CDLL("libssl.so.3")
        except OSError as exc:
            raise DeviceError(ErrorCode.TPM, f"OpenSSL 3 libraries not found: {exc}") from None
        version = _fn(crypto, "OpenSSL_version_num", ctypes.c_ulong)()
        if version != ssl.OPENSSL_VERSION_NUMBER:
            raise DeviceError(
                ErrorCode.TPM, "Python's ssl module is not linked against the system OpenSSL 3"
            )
        self.method_new = _fn(crypto, "EC_KEY_METHOD_new", c_void_p, c_void_p)
        self.openssl_method = _fn(crypto, "EC_KEY_OpenSSL", c_void_p)
        self.set_sign = _fn(crypto, "EC_KEY_METHOD_set_sign", None, c_void_p, _SIGN, _SIGN_SETUP,
                            _SIGN_SIG)  # fmt: skip
        self.d2i_pubkey = _fn(crypto, "d2i_EC_PUBKEY", c_void_p, c_void_p, POINTER(c_char_p),
                              c_long)  # fmt: skip
        self.set_method = _fn(crypto, "EC_KEY_set_method", c_int, c_void_p, c_void_p)
        self.ec_key_free = _fn(crypto, "EC_KEY_free", None, c_void_p)
        self.pkey_new = _fn(crypto, "EVP_PKEY_new", c_void_p)
        self.pkey_assign = _fn(crypto, "EVP_PKEY_assign", c_int, c_void_p, c_int, c_void_p)
        self.err_clear = _fn(crypto, "ERR_clear_error", None)
        self.use_key = _fn(libssl, "SSL_CTX_use_PrivateKey", c_int, c_void_p, c_void_p)
        self.use_chain = _fn(
            libssl, "SSL_CTX_use_certificate_chain_file", c_int, c_void_p, c_char_p
        )
        self.check_key = _fn(libssl, "SSL_CTX_check_private_key", c_int, c_void_p)
        self.get_options = _fn(libssl, "SSL_CTX_get_options", ctypes.c_uint64, c_void_p)
        self.get_verify_mode = _fn(libssl, "SSL_CTX_get_verify_mode", c_int, c_void_p)


_LIBS: _OpenSsl | None = None


def _libs() -> _OpenSsl:
    global _LIBS
    if _LIBS is None:
        _LIBS = _OpenSsl()
    return _LIBS


def _ssl_ctx_pointer(ctx: ssl.SSLContext, libs: _OpenSsl) -> int:
    """The ``SSL_CTX *`` inside an ``ssl.SSLContext``: CPython keeps it as the first field
    after the object header. Checked against two settings read back through OpenSSL, so a
    different layout is an error, never a write into the wrong memory."""
    ptr = c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr:
        raise DeviceError(ErrorCode.TPM, "cannot reach the SSL_CTX of this Python")
    want_verify = 1 if ctx.verify_mode != ssl.CERT_NONE else 0
    if (libs.get_verify_mode(ptr) & 1) != want_verify or libs.get_options(ptr) != int(ctx.options):
        raise DeviceError(ErrorCode.TPM, "unexpected SSLContext layout in this Python")
    return int(ptr)


class TlsKeyHook:
    """Keeps what OpenSSL calls back into alive as long as the contexts that use it."""

    def __init__(self, key: TpmKey) -> None:
        self.key = key
        self.failures = 0
        libs = _libs()
        self._sign = _SIGN(self._on_sign)
        self._method = libs.method_new(libs.openssl_method())
        libs.set_sign(self._method, self._sign, _SIGN_SETUP(), _SIGN_SIG())
        self._pkeys: list[int] = []

    def _on_sign(self, _type: int, dgst: Any, dlen: int, sig: Any, siglen: Any, *_: Any) -> int:
        try:
            der = self.key.sign_digest(bytes(dgst[:dlen]))
        except (DeviceError, TSS2_Exception):
            self.failures += 1
            return 0
        ctypes.memmove(sig, der, len(der))
        siglen[0] = len(der)
        return 1

    def _pkey(self) -> int:
        libs = _libs()
        spki = self.key.spki_der()
        buf = c_char_p(spki)
        eckey = libs.d2i_pubkey(None, ctypes.byref(buf), len(spki))
        if not eckey or libs.set_method(eckey, self._method) != 1:
            raise DeviceError(ErrorCode.TPM, "OpenSSL refused the TPM key's public part")
        pkey = libs.pkey_new()
        if not pkey or libs.pkey_assign(pkey, EVP_PKEY_EC, eckey) != 1:
            libs.ec_key_free(eckey)
            raise DeviceError(ErrorCode.TPM, "OpenSSL refused the TPM key")
        self._pkeys.append(pkey)  # owned by us; contexts take their own reference
        return int(pkey)

    def install(self, ctx: ssl.SSLContext, cert_file: Path) -> None:
        """``ctx.load_cert_chain(cert_file, <the TPM key>)``."""
        libs = _libs()
        ptr = _ssl_ctx_pointer(ctx, libs)
        libs.err_clear()
        if libs.use_chain(ptr, str(cert_file).encode()) != 1:
            libs.err_clear()
            raise DeviceError(ErrorCode.CERT, f"cannot load the certificate {cert_file}")
        if libs.use_key(ptr, self._pkey()) != 1 or libs.check_key(ptr) != 1:
            libs.err_clear()
            raise DeviceError(ErrorCode.CERT, "the device certificate is not for the TPM key")


# --- CSR -------------------------------------------------------------------------------------
def _der(tag: int, body: bytes) -> bytes:
    n = len(body)
    if n < 0x80:
        head = bytes([n])
    else:
        size = n.to_bytes((n.bit_length() + 7) // 8, "big")
        head = bytes([0x80 | len(size)]) + size
    return bytes([tag]) + head + body


_ECDSA_SHA256 = _der(0x30, _der(0x06, bytes.fromhex("2a8648ce3d040302")))


def tpm_csr(key: TpmKey, serial: str) -> bytes:
    """A PKCS#10 request naming ``serial`` (as :func:`~..renewal.make_csr` does), signed in the
    TPM. Built from DER here because ``cryptography`` signs only with keys it holds."""
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, serial),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, serial),
        ]
    ).public_bytes()
    info = _der(0x30, b"\x02\x01\x00" + name + key.spki_der() + b"\xa0\x00")
    digest = hashes.Hash(hashes.SHA256())
    digest.update(info)
    sig = key.sign_digest(digest.finalize())
    der = _der(0x30, info + _ECDSA_SHA256 + _der(0x03, b"\x00" + sig))
    csr = x509.load_der_x509_csr(der)
    if not csr.is_signature_valid:
        raise DeviceError(ErrorCode.TPM, "the TPM's CSR signature does not verify")
    return csr.public_bytes(serialization.Encoding.PEM)


# --- what the agent plugs in -------------------------------------------------------------------
def tpm_key_loader(tpm: Tpm) -> KeyLoader:
    """The TLS client's key loader on a TPM device: the key file must be a TPM blob (a TPM
    device never presents a key that is not TPM-held). A key stays loaded while it is one of
    the last two used (the current identity and a renewal's pending one): a TPM holds only a
    few loaded objects, and without the kernel's resource manager none are swapped out."""
    hooks: dict[bytes, TlsKeyHook] = {}

    def load(ctx: ssl.SSLContext, cert_file: Path, key_file: Path) -> None:
        pem = key_file.read_bytes()
        if not is_tpm_key(pem):
            raise DeviceError(ErrorCode.TPM_NV, "identity key is not held by the TPM")
        hook = hooks.pop(pem, None)
        if hook is None:
            while len(hooks) >= MAX_LOADED_KEYS:
                hooks.pop(next(iter(hooks))).key.close()
            hook = TlsKeyHook(TpmKey(tpm, pem))
        hooks[pem] = hook  # most recently used last
        hook.install(ctx, cert_file)

    return load


def tpm_key_maker(tpm: Tpm) -> KeyMaker:
    """Certificate renewal on a TPM device: each new key is created inside the TPM too."""

    def make(serial: str) -> NewKey:
        blob = create_identity_key(tpm)
        key = TpmKey(tpm, blob)
        try:
            return NewKey(blob, key.spki_der(), tpm_csr(key, serial))
        finally:
            key.close()

    return make
