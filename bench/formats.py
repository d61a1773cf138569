"""SUIT and MCUboot side by side for one update (printed by bench/manifest.py).

Bytes: what a device receives beyond the image itself: the SUIT envelope, or MCUboot's header +
protected TLVs + hash/key-hash/signature TLVs (the "TLV overhead"); TUF's per-update metadata
(timestamp+snapshot+targets, from bench/manifest.py's python-tuf build) in its own column
(otaguard's TUF repository, built by another part of issue #18, can take its verify-time cell).
Time per update, both with our own code (no imgtool): the SUIT route is ``verify_envelope`` +
SHA-256 of the image as the device streams it; the MCUboot route is ``verify_image`` over the
whole signed image (its hash covers header + image + protected TLVs, so hashing the image is
part of it). Ed25519 and ECDSA P-256 keys, same image size (``IMAGE_SIZE``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable

from otaguard.crypto.software import SoftwareSigner, generate_private_key
from otaguard.manifest.build import build_envelope
from otaguard.manifest.model import ManifestInfo
from otaguard.manifest.verify import verify_envelope
from otaguard.mcuboot.image import Geometry, ImageVersion, sign_image, verify_image
from otaguard.trust.model import StaticKeys

PerCall = Callable[[dict[str, Callable[[], object]], int, int], dict[str, float]]


def side_by_side(
    info: ManifestInfo,
    tuf_bytes: int,
    tuf_update: Callable[[], object],
    image_size: int,
    per_call: PerCall,
    rounds: int,
) -> None:
    """One update of each format, verify time including the image's SHA-256 (what a device
    does before it trusts the bytes): SUIT, MCUboot (per key type) and otaguard's TUF
    repository (python-tuf ngclient's checks of timestamp + snapshot + targets, Ed25519)."""
    image = os.urandom(image_size)
    info = dataclasses.replace(info, image_digest=hashlib.sha256(image).digest())
    version = ImageVersion.from_release(info.version)
    rows = []
    fns: dict[str, Callable[[], object]] = {}
    for kind in ("ed25519", "p256"):
        signer = SoftwareSigner(generate_private_key(kind))  # type: ignore[arg-type]
        keys = StaticKeys([signer.public_key])
        env = build_envelope(info, [signer])
        mc = sign_image(image, version, info.security_counter, signer, Geometry())
        v = verify_image(mc, [signer.public_key])
        assert bytes(v.parsed.image) == image and v.security_counter == info.security_counter

        def suit(env: bytes = env, keys: StaticKeys = keys) -> object:
            vm = verify_envelope(env, keys)
            assert hashlib.sha256(image).digest() == vm.info.image_digest
            return vm

        def mcuboot(mc: bytes = mc, key: object = signer.public_key) -> object:
            return verify_image(mc, [key])  # type: ignore[list-item]

        fns[f"suit-{kind}"], fns[f"mcuboot-{kind}"] = suit, mcuboot
        rows.append((kind, len(env), v.parsed.tlv_overhead))

    def tuf() -> object:
        tuf_update()
        return hashlib.sha256(image).digest()

    fns["tuf"] = tuf
    times = per_call(fns, max(rounds // 10, 5), 2)
    mib = image_size / 1_048_576
    print(f"## SUIT vs MCUboot vs TUF: one update of a {mib:g} MiB image (side by side)")
    print()
    print(
        "| key | SUIT envelope B | MCUboot TLV overhead B | TUF metadata B | "
        "SUIT verify us/update | MCUboot verify us/update | TUF verify us/update |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for kind, suit_b, mc_b in rows:
        print(
            f"| {kind} | {suit_b} | {mc_b} | {tuf_bytes} | {times[f'suit-{kind}']:.0f} | "
            f"{times[f'mcuboot-{kind}']:.0f} | {times['tuf']:.0f} |"
        )
    print()
    print(
        "SUIT verify = verify_envelope + SHA-256 of the image; MCUboot verify = our verify_image "
        "(parse, SHA-256 over header + image + protected TLVs, key hash, signature). TUF bytes: "
        "timestamp+snapshot+targets of otaguard's TUF repository (Ed25519 keys); TUF verify = "
        "python-tuf ngclient's checks (root load, timestamp, snapshot, targets) + SHA-256 of "
        "the image."
    )
