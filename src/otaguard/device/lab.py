"""A throwaway trust hierarchy and signed releases for simulated devices.

Used by the device tests, ``bench/device.py`` and demos: a root key, one operational key
authorized for one (vendor, class), the trust bundle a factory would provision, and helpers
that sign manifests for arbitrary images. Keys are generated in memory at run time and never
written anywhere (development only, like every SoftwareSigner).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from ..crypto.algorithms import HashAlg
from ..crypto.cose import Signer
from ..crypto.software import SoftwareSigner, generate_private_key
from ..manifest.build import build_envelope
from ..manifest.ids import class_id, vendor_id
from ..manifest.model import DeltaInfo, ManifestInfo
from ..trust.bundle import TrustBundle
from ..trust.documents import issue_authorization, sign_keylist
from ..trust.model import Role, Scope
from .device import Device, Provisioning
from .layout import LayoutConfig

T0 = 1_800_000_000
DAY = 86400


def image_bytes(size: int, seed: int) -> bytes:
    """Deterministic pseudo-firmware of ``size`` bytes."""
    out = bytearray()
    counter = 0
    while len(out) < size:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:size])


def chunks(data: bytes, n: int = 4096) -> Iterator[bytes]:
    for i in range(0, len(data), n):
        yield data[i : i + n]


class Lab:
    def __init__(
        self,
        *,
        vendor: str = "hvac.example.com",
        model: str = "ctl-9",
        hw_rev: str = "rev-b",
        now: int = T0,
        kind: str = "ed25519",
        op: SoftwareSigner | None = None,
    ) -> None:
        self.now = now
        self.model = model
        self.hw_rev = hw_rev
        self.vendor_id = vendor_id(vendor)
        self.class_id = class_id(self.vendor_id, model, hw_rev)
        self.root = SoftwareSigner(generate_private_key("ed25519"))
        self.op = op or SoftwareSigner(generate_private_key(kind))  # type: ignore[arg-type]
        self.keylist_version = 1
        self.auths = [self.authorize(self.op)]
        self.keylist = sign_keylist(
            self.root, version=1, authorizations=self.auths, issued_at=now - DAY
        )
        self.bundle = TrustBundle(self.root.public_key, self.keylist)

    def authorize(self, key: SoftwareSigner, *, class_ids: Sequence[uuid.UUID] = ()) -> bytes:
        return issue_authorization(
            self.root,
            key.public_key,
            roles=frozenset({Role.FIRMWARE, Role.KEYLIST}),
            scopes=[Scope(self.vendor_id, frozenset(class_ids or [self.class_id]))],
            not_before=self.now - 30 * DAY,
            not_after=self.now + 300 * DAY,
            name="lab",
        )

    def keylist_update(
        self,
        extra: Sequence[SoftwareSigner] = (),
        *,
        revoked: Iterable[bytes] = (),
        keep_op: bool = True,
        by: Signer | None = None,
        version: int | None = None,
    ) -> bytes:
        """A key-list update (next version unless given) adding ``extra`` keys."""
        if version is None:
            self.keylist_version += 1
            version = self.keylist_version
        auths = (self.auths if keep_op else []) + [self.authorize(k) for k in extra]
        return sign_keylist(
            by or self.root,
            version=version,
            authorizations=auths,
            revoked=frozenset(revoked),
            issued_at=self.now - DAY + version,
        )

    def info(
        self,
        image: bytes | tuple[bytes, int],
        *,
        version: str,
        seq: int,
        counter: int = 0,
        min_version: str | None = None,
        expires: int | None = None,
        vendor: uuid.UUID | None = None,
        klass: uuid.UUID | None = None,
        delta: DeltaInfo | None = None,
        **text: str,
    ) -> ManifestInfo:
        if isinstance(image, bytes):
            digest, size = hashlib.sha256(image).digest(), len(image)
        else:
            digest, size = image
        return ManifestInfo(
            sequence_number=seq,
            vendor_id=vendor or self.vendor_id,
            class_id=klass or self.class_id,
            digest_alg=HashAlg.SHA256,
            image_digest=digest,
            image_size=size,
            version=version,
            min_version=min_version,
            security_counter=counter,
            expires=expires,
            uri=None,
            text={"model": self.model, "hw_rev": self.hw_rev, **text},
            delta=delta,
        )

    def release(
        self,
        image: bytes | tuple[bytes, int],
        *,
        signers: Sequence[Signer] | None = None,
        **kw: Any,
    ) -> bytes:
        return build_envelope(self.info(image, **kw), list(signers or [self.op]))

    def delta_release(self, base: bytes, image: bytes, patch: bytes, **kw: Any) -> bytes:
        """A delta manifest: ``patch`` turns ``base`` into ``image`` (same kw as release)."""
        d = DeltaInfo(
            base_digest=hashlib.sha256(base).digest(),
            patch_digest=hashlib.sha256(patch).digest(),
            patch_size=len(patch),
            patch_uri=None,
        )
        return self.release(image, delta=d, **kw)

    def provision(
        self,
        directory: str | os.PathLike[str],
        factory_image: bytes,
        *,
        cfg: LayoutConfig | None = None,
        version: str = "1.0.0",
        seq: int = 1,
        counter: int = 1,
        identity: Any = None,
        **device_kwargs: Any,
    ) -> Device:
        manifest = self.release(factory_image, version=version, seq=seq, counter=counter)
        prov = Provisioning(
            bundle=self.bundle,
            vendor_id=self.vendor_id,
            class_id=self.class_id,
            model=self.model,
            hw_rev=self.hw_rev,
            factory_manifest=manifest,
            identity=identity,
        )
        device_kwargs.setdefault("clock", lambda: self.now)
        return Device.create(
            directory, cfg or LayoutConfig(), prov, chunks(factory_image), **device_kwargs
        )


class MemoryTransport:
    """An in-memory update source; ``drop_at`` simulates a network drop after that offset.

    With ``patch`` it is also a delta source: ``delta_manifest`` is offered next to the full
    ``manifest`` (or ``manifest`` itself is a delta manifest); ``patch_drop_at`` drops the
    patch download once at that offset.
    """

    def __init__(
        self,
        manifest: bytes,
        image: bytes | Iterable[bytes],
        *,
        chunk: int = 4096,
        drop_at: int | None = None,
        endpoint: str = "mem://update-server",
        patch: bytes | None = None,
        delta_manifest: bytes | None = None,
        patch_drop_at: int | None = None,
    ) -> None:
        self.manifest = manifest
        self.image = image
        self.chunk = chunk
        self.drop_at = drop_at
        self.endpoint = endpoint
        self.patch = patch
        self.delta_manifest = delta_manifest
        self.patch_drop_at = patch_drop_at
        self.events: list[dict[str, Any]] = []
        self.offsets: list[int] = []
        self.patch_offsets: list[int] = []

    def fetch_manifest(self) -> bytes:
        return self.manifest

    def fetch_delta_manifest(self) -> bytes | None:
        return self.delta_manifest

    def open_patch(self, offset: int) -> Iterator[bytes]:
        from ..errors import DeviceError, ErrorCode

        if self.patch is None:
            raise DeviceError(ErrorCode.NOT_FOUND, "no patch on this source")
        self.patch_offsets.append(offset)
        pos = offset
        while pos < len(self.patch):
            if self.patch_drop_at is not None and pos >= self.patch_drop_at:
                self.patch_drop_at = None
                raise DeviceError(ErrorCode.TRANSPORT, f"connection dropped at {pos}")
            piece = self.patch[pos : pos + self.chunk]
            pos += len(piece)
            yield piece

    def open_image(self, offset: int) -> Iterator[bytes]:
        from ..errors import DeviceError, ErrorCode

        self.offsets.append(offset)
        if not isinstance(self.image, bytes):
            if offset:
                raise DeviceError(ErrorCode.TRANSPORT, "stream source cannot resume")
            yield from self.image
            return
        pos = offset
        while pos < len(self.image):
            if self.drop_at is not None and pos >= self.drop_at:
                self.drop_at = None  # the link comes back for the next attempt
                raise DeviceError(ErrorCode.TRANSPORT, f"connection dropped at {pos}")
            piece = self.image[pos : pos + self.chunk]
            pos += len(piece)
            yield piece

    def report(self, event: dict[str, Any]) -> None:
        self.events.append(event)
