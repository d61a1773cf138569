"""TPM 2.0 secure storage for the Linux agent (docs/device-linux.md, "TPM 2.0").

What files on the data partition cannot give: counters that do not go back when the whole disk
is rewritten with an older copy, a root-key hash nobody can change after the factory, and an
identity key that cannot be copied. The TPM keeps all three:

- NV ``0x01500100``, the root anchor: OTP (root-key hash, vendor/class, model, hw rev, HUK) and
  the counter bases; ordinary, owner-write, auth-read, no DA, written and **write-locked** until
  the index is deleted (WRITEDEFINE);
- NV ``0x01500101`` (security counter), ``0x01500102`` (key-list version): counters (they only
  move by ``TPM2_NV_Increment``), auth read/write, no DA, written;
- ``0x81000100``: the storage root key, the identity key's parent (ECC P-256 restricted
  decrypt, fixedTPM, fixedParent).

Anything else at those handles (an ordinary index where a counter should be, an anchor that is
not write-locked) is E_TPM_NV, and the agent stops: it never falls back to the weaker file
store. A TPM counter starts at an arbitrary value (the TPM's highest count so far), so the
first value read at provisioning is written into the locked anchor as the counter's base and
the agent's counter is ``value - base``.

This module implements :class:`~..hal.OtpMedia` (the anchor) and :class:`~..hal.CounterFloor`
(the counters) for :class:`~..storage.SecureStorage`: the agent's logic is unchanged; the
counter record stays on disk (with the sequence number) and the TPM is its floor.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ...errors import DeviceError, ErrorCode

# The TSS logs every TPM error response on stderr; the agent reports one line with a code.
os.environ.setdefault("TSS2_LOG", "all+NONE")

from tpm2_pytss import ESAPI, TSS2_Exception
from tpm2_pytss.constants import (
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_NT,
    TPM2_PT,
    TPM2_RC,
    TPMA_NV,
    TPMA_OBJECT,
    TPMA_PERMANENT,
)
from tpm2_pytss.tsskey import TSSPrivKey, _parent_ecc_template
from tpm2_pytss.types import (
    TPM2B_NV_PUBLIC,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPMS_NV_PUBLIC,
)

SRK_HANDLE = 0x81000100
ANCHOR_INDEX = 0x01500100
SECURITY_INDEX = 0x01500101
KEYLIST_INDEX = 0x01500102

_NT_SHIFT = int(TPMA_NV.TPM2_NT_SHIFT)
COUNTER_ATTRS = (
    TPMA_NV.AUTHWRITE | TPMA_NV.AUTHREAD | TPMA_NV.NO_DA | (int(TPM2_NT.COUNTER) << _NT_SHIFT)
)
ANCHOR_ATTRS = (
    TPMA_NV.OWNERWRITE
    | TPMA_NV.OWNERREAD
    | TPMA_NV.AUTHREAD
    | TPMA_NV.WRITEDEFINE
    | TPMA_NV.NO_DA
    | (int(TPM2_NT.ORDINARY) << _NT_SHIFT)
)
SRK_ATTRS = int(_parent_ecc_template.objectAttributes)
ANCHOR_MAGIC = b"OGTA"
_ANCHOR_HDR = struct.Struct(">4sQQ")  # magic, security counter base, key-list counter base
MAX_ANCHOR = 512  # one NV read/write on every TPM (TPM_PT_NV_BUFFER_MAX is 512 or more)
DEFAULT_TCTI = "device:/dev/tpmrm0"


def tpm_error(exc: TSS2_Exception, what: str) -> DeviceError:
    """A TSS/TPM failure as the agent's one-line error with its code."""
    base = int(exc.error) if exc.fmt1 else int(exc.rc) & 0xFFF
    rc = int(exc.rc) & 0xFFF
    if TPM2_RC.LOCKOUT in (base, rc):
        return DeviceError(ErrorCode.TPM_LOCKOUT, f"{what}: the TPM is in lockout")
    if base in (TPM2_RC.AUTH_FAIL, TPM2_RC.BAD_AUTH) or rc == TPM2_RC.AUTH_MISSING:
        return DeviceError(ErrorCode.TPM_AUTH, f"{what}: the TPM refused the authorization")
    if base in (TPM2_RC.HANDLE, TPM2_RC.NV_LOCKED, TPM2_RC.ATTRIBUTES, TPM2_RC.NV_DEFINED):
        return DeviceError(ErrorCode.TPM_NV, f"{what}: {exc}")
    return DeviceError(ErrorCode.TPM, f"{what}: {exc}")


@dataclass(frozen=True)
class NvIndex:
    handle: int
    tr: Any  # ESYS_TR
    attrs: int
    size: int


class Tpm:
    """One ESAPI connection, refused up front when the TPM cannot be used safely."""

    def __init__(self, tcti: str = DEFAULT_TCTI) -> None:
        self.tcti = tcti
        if tcti.startswith("device:"):
            dev = Path(tcti.split(":", 1)[1] or "/dev/tpmrm0")
            if not dev.exists():
                raise DeviceError(ErrorCode.TPM, f"no TPM: {dev} does not exist")
        try:
            self.ectx = ESAPI(tcti)
        except TSS2_Exception as exc:
            raise DeviceError(ErrorCode.TPM, f"no TPM at {tcti}: {exc}") from None
        try:
            _, cap = self.ectx.get_capability(TPM2_CAP.TPM_PROPERTIES, TPM2_PT.PERMANENT, 1)
        except TSS2_Exception as exc:
            self.close()
            raise tpm_error(exc, f"TPM at {tcti}") from None
        props = cap.data.tpmProperties
        permanent = (
            int(props[0].value) if len(props) and props[0].property == TPM2_PT.PERMANENT else 0
        )
        if permanent & TPMA_PERMANENT.INLOCKOUT:
            self.close()
            raise DeviceError(
                ErrorCode.TPM_LOCKOUT,
                "the TPM is in dictionary-attack lockout (wait for recovery or reset it)",
            )

    def close(self) -> None:
        ectx, self.ectx = getattr(self, "ectx", None), None
        if ectx is not None:
            ectx.close()

    @contextmanager
    def call(self, what: str) -> Iterator[None]:
        try:
            yield
        except TSS2_Exception as exc:
            raise tpm_error(exc, what) from None

    def nv(self, handle: int) -> NvIndex | None:
        """The NV index at ``handle`` and its public area; None when nothing is defined."""
        try:
            tr = self.ectx.tr_from_tpmpublic(handle)
        except TSS2_Exception as exc:
            if int(exc.error) == TPM2_RC.HANDLE:
                return None
            raise tpm_error(exc, f"NV index {handle:#010x}") from None
        with self.call(f"NV index {handle:#010x}"):
            pub, _ = self.ectx.nv_read_public(tr)
        p = pub.nvPublic
        return NvIndex(handle, tr, int(p.attributes), int(p.dataSize))

    def set_owner_auth(self, auth: bytes) -> None:
        self.ectx.tr_set_auth(ESYS_TR.OWNER, auth)

    def take_ownership(self, new_auth: bytes) -> None:
        """Set the owner password (the factory keeps it; the device never needs it again)."""
        with self.call("changing the owner password"):
            self.ectx.hierarchy_change_auth(ESYS_TR.OWNER, new_auth)
        self.set_owner_auth(new_auth)


def _require(index: NvIndex | None, want: int, name: str) -> NvIndex:
    if index is None:
        raise DeviceError(ErrorCode.TPM_NV, f"TPM NV index for the {name} is missing")
    if index.attrs != want:
        raise DeviceError(
            ErrorCode.TPM_NV,
            f"TPM NV index {index.handle:#010x} ({name}) has attributes {index.attrs:#010x}, "
            f"expected {want:#010x}",
        )
    return index


class TpmStore:
    """OTP in a write-locked NV index and the two monotonic counters as NV counters.

    ``owner_auth`` is needed only to provision (define and lock the indexes); a running agent
    reads and increments with the indexes' own (empty) authorization.
    """

    def __init__(self, tpm: Tpm, *, owner_auth: bytes | None = None) -> None:
        self.tpm = tpm
        self.owner_auth = owner_auth
        self._bases: tuple[int, int] | None = None

    # --- the anchor (OtpMedia) -------------------------------------------------------------
    def _anchor(self) -> bytes | None:
        idx = self.tpm.nv(ANCHOR_INDEX)
        if idx is None:
            return None
        idx = _require(idx, ANCHOR_ATTRS | TPMA_NV.WRITTEN | TPMA_NV.WRITELOCKED, "root anchor")
        if not _ANCHOR_HDR.size <= idx.size <= MAX_ANCHOR:
            raise DeviceError(ErrorCode.TPM_NV, "TPM root anchor has an unexpected size")
        with self.tpm.call("reading the TPM root anchor"):
            raw = bytes(self.tpm.ectx.nv_read(idx.tr, idx.size, 0, idx.tr))
        magic, sec_base, kl_base = _ANCHOR_HDR.unpack(raw[: _ANCHOR_HDR.size])
        if magic != ANCHOR_MAGIC:
            raise DeviceError(ErrorCode.TPM_NV, "TPM root anchor is not ours")
        self._bases = (sec_base, kl_base)
        return raw[_ANCHOR_HDR.size :]

    def read_otp(self) -> bytes | None:
        return self._anchor()

    def program_otp(self, body: bytes) -> None:
        """Counters first (their bases go into the anchor), then the anchor, written once and
        locked: from then on not even the owner can change it without deleting it."""
        if self.owner_auth is None:
            raise DeviceError(ErrorCode.STATE, "the TPM is provisioned only by `agent provision`")
        if self.tpm.nv(ANCHOR_INDEX) is not None:
            raise DeviceError(ErrorCode.OTP_WRITTEN, "the TPM root anchor is already written")
        content = (
            _ANCHOR_HDR.pack(
                ANCHOR_MAGIC, self._new_counter(SECURITY_INDEX), self._new_counter(KEYLIST_INDEX)
            )
            + body
        )
        if len(content) > MAX_ANCHOR:
            raise DeviceError(ErrorCode.TOO_LARGE, "OTP contents too large for the TPM anchor")
        e = self.tpm.ectx
        self.tpm.set_owner_auth(self.owner_auth)
        with self.tpm.call("defining the TPM root anchor"):
            pub = TPM2B_NV_PUBLIC(
                nvPublic=TPMS_NV_PUBLIC(
                    nvIndex=ANCHOR_INDEX,
                    nameAlg=TPM2_ALG.SHA256,
                    attributes=ANCHOR_ATTRS,
                    dataSize=len(content),
                )
            )
            tr = e.nv_define_space(b"", pub, ESYS_TR.OWNER)
            e.nv_write(tr, content, 0, ESYS_TR.OWNER)
            e.nv_write_lock(tr, ESYS_TR.OWNER)
        self._bases = None

    def _new_counter(self, handle: int) -> int:
        """Define (or reuse, after an interrupted provisioning) a counter; its base value."""
        idx = self.tpm.nv(handle)
        e = self.tpm.ectx
        if idx is None:
            assert self.owner_auth is not None
            self.tpm.set_owner_auth(self.owner_auth)
            with self.tpm.call(f"defining TPM counter {handle:#010x}"):
                pub = TPM2B_NV_PUBLIC(
                    nvPublic=TPMS_NV_PUBLIC(
                        nvIndex=handle,
                        nameAlg=TPM2_ALG.SHA256,
                        attributes=COUNTER_ATTRS,
                        dataSize=8,
                    )
                )
                tr = e.nv_define_space(b"", pub, ESYS_TR.OWNER)
            idx = NvIndex(handle, tr, COUNTER_ATTRS, 8)
        if not idx.attrs & TPMA_NV.WRITTEN:
            _require(idx, COUNTER_ATTRS, "a counter")
            with self.tpm.call(f"starting TPM counter {handle:#010x}"):
                e.nv_increment(idx.tr, idx.tr)  # a counter reads only once incremented
        return self._count(handle)

    # --- the counters (CounterFloor) -------------------------------------------------------
    def _count(self, handle: int) -> int:
        name = "security counter" if handle == SECURITY_INDEX else "key-list version"
        idx = _require(self.tpm.nv(handle), COUNTER_ATTRS | TPMA_NV.WRITTEN, name)
        with self.tpm.call(f"reading the TPM {name}"):
            raw = bytes(self.tpm.ectx.nv_read(idx.tr, 8, 0, idx.tr))
        return int.from_bytes(raw, "big")

    def bases(self) -> tuple[int, int]:
        if self._bases is None and self._anchor() is None:
            raise DeviceError(ErrorCode.TPM_NV, "TPM root anchor is missing")
        assert self._bases is not None
        return self._bases

    def floor(self) -> tuple[int, int]:
        sec_base, kl_base = self.bases()
        sec, kl = self._count(SECURITY_INDEX), self._count(KEYLIST_INDEX)
        if sec < sec_base or kl < kl_base:
            raise DeviceError(ErrorCode.TPM_NV, "TPM counter below its provisioned base")
        return sec - sec_base, kl - kl_base

    def raise_to(self, security: int, keylist_version: int) -> None:
        """One NV_Increment per step: a TPM counter cannot be set, only counted up."""
        for handle, base, target in zip(
            (SECURITY_INDEX, KEYLIST_INDEX), self.bases(), (security, keylist_version), strict=True
        ):
            cur = self._count(handle) - base
            if cur >= target:
                continue
            idx = self.tpm.nv(handle)
            assert idx is not None
            with self.tpm.call(f"raising TPM counter {handle:#010x}"):
                for _ in range(target - cur):
                    self.tpm.ectx.nv_increment(idx.tr, idx.tr)


# --- the identity key ----------------------------------------------------------------------
def ensure_srk(tpm: Tpm, owner_auth: bytes) -> None:
    """The storage root key at :data:`SRK_HANDLE` (created and made persistent once)."""
    e = tpm.ectx
    try:
        tr = e.tr_from_tpmpublic(SRK_HANDLE)
    except TSS2_Exception as exc:
        if int(exc.error) != TPM2_RC.HANDLE:
            raise tpm_error(exc, "storage root key") from None
        tpm.set_owner_auth(owner_auth)
        with tpm.call("creating the storage root key"):
            handle, _, _, _, _ = e.create_primary(
                TPM2B_SENSITIVE_CREATE(), TPM2B_PUBLIC(publicArea=_parent_ecc_template)
            )
            e.evict_control(ESYS_TR.OWNER, handle, SRK_HANDLE)
            e.flush_context(handle)
        return
    with tpm.call("storage root key"):
        pub, _, _ = e.read_public(tr)
    area = pub.publicArea
    if area.type != TPM2_ALG.ECC or int(area.objectAttributes) != SRK_ATTRS:
        raise DeviceError(
            ErrorCode.TPM_NV, f"the key at {SRK_HANDLE:#010x} is not a storage root key"
        )


def create_identity_key(tpm: Tpm) -> bytes:
    """A P-256 signing key created inside the TPM (fixedTPM, fixedParent,
    sensitiveDataOrigin): the returned "TSS2 PRIVATE KEY" PEM is the key's public part and its
    private part *wrapped by the storage root key*, usable only inside this TPM."""
    with tpm.call("creating the identity key"):
        key = TSSPrivKey.create_ecc(tpm.ectx, parent=SRK_HANDLE)
    attrs = int(key.public.publicArea.objectAttributes)
    need = TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
    if attrs & need != need:  # the template is tpm2-pytss's: checked, not assumed
        raise DeviceError(ErrorCode.TPM, "identity key template is not fixedTPM/fixedParent")
    pem: bytes = key.to_pem()
    return pem


def is_tpm_key(pem: bytes) -> bool:
    first = pem.lstrip().split(b"\n", 1)[0]
    return first.startswith(b"-----BEGIN ") and b"TSS2 PRIVATE KEY" in first
