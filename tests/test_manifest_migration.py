"""Migration from manifest layout 1 (custom parameters in the shared sequence) to the conformant
layout 2 (docs/formats.md, "Migration from layout 1").

Devices accept both layouts for the transition period, each through its one decoding path,
and both give the same ManifestInfo, so every check after decoding is the same code; only
layout 2 is ever written. ``accept_legacy=False`` retires layout 1 for new installs, while an
installed (pinned) layout-1 envelope keeps booting.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings

from otaguard import cbor
from otaguard.crypto.software import SoftwareSigner, generate_private_key
from otaguard.delta import create_patch
from otaguard.device.device import Device, Provisioning
from otaguard.device.lab import Lab, MemoryTransport, chunks, image_bytes
from otaguard.device.layout import LayoutConfig
from otaguard.errors import ErrorCode, OtaError
from otaguard.manifest import canonical, suit
from otaguard.manifest.build import build_envelope, sign_manifest
from otaguard.manifest.model import ManifestInfo
from otaguard.manifest.profile import LAYOUT_CURRENT, LAYOUT_LEGACY, encode_manifest
from otaguard.manifest.verify import decode_pinned, verify_envelope, verify_strict
from otaguard.trust.model import StaticKeys
from tests.suit_legacy import legacy_manifest
from tests.test_manifest_canonical import infos
from tests.test_manifest_verify import make_info

ED = SoftwareSigner(generate_private_key("ed25519"))
KEYS = StaticKeys([ED.public_key])
CFG = LayoutConfig(sector_size=4096, page_size=256, slot_size=8 * 4096, manifest_size=4096)
V1 = image_bytes(20_000, 1)
V2 = image_bytes(22_000, 2)


@pytest.fixture(autouse=True)
def _quiet(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="otaguard.keys")


def legacy_envelope(info: ManifestInfo, signers: Any = (ED,)) -> bytes:
    return sign_manifest(legacy_manifest(info), list(signers), info.digest_alg)


@settings(max_examples=200, deadline=None)
@given(infos())
def test_both_layouts_give_the_same_manifest_info(info: ManifestInfo) -> None:
    old, new = legacy_envelope(info), build_envelope(info, [ED])
    assert legacy_manifest(info) != encode_manifest(info)
    vm_old, vm_new = verify_envelope(old, KEYS), verify_envelope(new, KEYS)
    assert vm_old.info == vm_new.info == info
    assert (vm_old.layout, vm_new.layout) == (LAYOUT_LEGACY, LAYOUT_CURRENT)
    # layout 1 is never on the canonical route: the strict route decodes it
    assert canonical.verify(old, KEYS, None) is None
    assert canonical.verify(new, KEYS, None) is not None
    assert verify_strict(new, KEYS).info == info
    assert decode_pinned(old).info == info


def test_retired_legacy_layout_is_refused_after_authentication() -> None:
    info = make_info()
    old = legacy_envelope(info)
    with pytest.raises(OtaError) as e:
        verify_envelope(old, KEYS, accept_legacy=False)
    assert e.value.code == ErrorCode.UNSUPPORTED
    # still authenticated first: an unknown signer is that, not a layout problem
    other = SoftwareSigner(generate_private_key("ed25519"))
    with pytest.raises(OtaError) as e:
        verify_envelope(legacy_envelope(info, [other]), KEYS, accept_legacy=False)
    assert e.value.code == ErrorCode.UNTRUSTED_KEY
    assert verify_envelope(build_envelope(info, [ED]), KEYS, accept_legacy=False).info == info
    assert decode_pinned(old).layout == LAYOUT_LEGACY  # installed firmware keeps booting


def _resign_legacy(mutate: Any, info: ManifestInfo | None = None) -> bytes:
    manifest = cbor.loads(legacy_manifest(info or make_info()))
    mutate(manifest)
    return sign_manifest(cbor.dumps(manifest), [ED])


def _shared(fn: Any) -> Any:
    def inner(manifest: dict[Any, Any]) -> None:
        common = cbor.loads(manifest[suit.MAN_COMMON])
        shared = cbor.loads(common[suit.COMMON_SHARED_SEQUENCE])
        fn(shared)
        common[suit.COMMON_SHARED_SEQUENCE] = cbor.dumps(shared)
        manifest[suit.MAN_COMMON] = cbor.dumps(common)

    return inner


def _code(env: bytes) -> ErrorCode:
    with pytest.raises(OtaError) as e:
        verify_envelope(env, KEYS)
    return e.value.code


def test_legacy_path_is_as_strict_as_before() -> None:
    # a delta without the counter in the shared sequence is not a layout-1 manifest
    no_counter = _shared(lambda s: s[1].pop(suit.P_OTA_SECURITY_COUNTER))
    with_delta = make_info(delta=_delta_info(V1, b"patch"))
    assert _code(_resign_legacy(no_counter, with_delta)) == ErrorCode.MALFORMED
    # nor is one with no custom parameter at all (it reads as layout 2: no counter in validate)
    assert _code(_resign_legacy(no_counter)) == ErrorCode.UNSUPPORTED
    # layout 1 with layout 2's validate (counter twice) fits neither layout
    both = {suit.P_OTA_SECURITY_COUNTER: 1}
    validate = cbor.dumps([suit.DIR_OVERRIDE_PARAMETERS, both, suit.COND_IMAGE_MATCH, 15])
    mixed = _resign_legacy(lambda m: m.__setitem__(suit.MAN_VALIDATE, validate))
    assert _code(mixed) == ErrorCode.UNSUPPORTED
    # unknown custom parameters stay unknown in either layout
    assert _code(_resign_legacy(_shared(lambda s: s[1].__setitem__(-300, 1)))) == (
        ErrorCode.CRITICAL_UNKNOWN
    )


def test_layout_2_refuses_custom_parameters_in_shared_next_to_its_validate() -> None:
    """A layout-2 manifest with the counter also in the shared sequence is no layout."""
    manifest = cbor.loads(encode_manifest(make_info()))
    _shared(lambda s: s[1].__setitem__(suit.P_OTA_SECURITY_COUNTER, 1))(manifest)
    assert _code(sign_manifest(cbor.dumps(manifest), [ED])) == ErrorCode.UNSUPPORTED


def test_layout_2_install_and_validate_shapes_are_fixed() -> None:
    info = make_info()
    manifest = cbor.loads(encode_manifest(info))
    install = cbor.loads(manifest[suit.MAN_INSTALL])
    install[1][suit.P_IMAGE_SIZE] = 5  # a standard parameter install may not set
    manifest[suit.MAN_INSTALL] = cbor.dumps(install)
    assert _code(sign_manifest(cbor.dumps(manifest), [ED])) == ErrorCode.UNSUPPORTED
    manifest = cbor.loads(encode_manifest(info))
    manifest[suit.MAN_INSTALL] = cbor.dumps([suit.DIR_SET_PARAMETERS, {}])
    assert _code(sign_manifest(cbor.dumps(manifest), [ED])) == ErrorCode.MALFORMED
    manifest = cbor.loads(encode_manifest(info))
    manifest[suit.MAN_VALIDATE] = cbor.dumps([suit.COND_IMAGE_MATCH, 15])  # no counter
    assert _code(sign_manifest(cbor.dumps(manifest), [ED])) == ErrorCode.UNSUPPORTED


# --- on a simulated device --------------------------------------------------------------------
LAB = Lab()


def _legacy_release(image: bytes, **kw: Any) -> bytes:
    return legacy_envelope(LAB.info(image, **kw), [LAB.op])


@pytest.fixture(scope="module")
def field_device(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A device in the field: provisioned (factory manifest) in layout 1."""
    d = tmp_path_factory.mktemp("migration") / "base"
    prov = Provisioning(
        bundle=LAB.bundle,
        vendor_id=LAB.vendor_id,
        class_id=LAB.class_id,
        model=LAB.model,
        hw_rev=LAB.hw_rev,
        factory_manifest=_legacy_release(V1, version="1.0.0", seq=1, counter=1),
    )
    Device.create(d, CFG, prov, chunks(V1), clock=lambda: LAB.now).close()
    return d


@pytest.fixture
def dev_dir(field_device: Path, tmp_path: Path) -> Path:
    d = tmp_path / "dev"
    shutil.copytree(field_device, d)
    return d


def _confirm(d: Path, version: str) -> None:
    with Device(d, clock=lambda: LAB.now) as dev:
        r = dev.boot()
        assert (r.mode, r.version) == ("test", version)
        dev.confirm()
    with Device(d, clock=lambda: LAB.now) as dev:
        assert (dev.boot().mode, dev.boot().version) == ("normal", version)


@pytest.mark.parametrize("layout", ["legacy", "current"])
def test_field_device_installs_either_layout(dev_dir: Path, layout: str) -> None:
    kw = {"version": "2.0.0", "seq": 2, "counter": 2}
    env = _legacy_release(V2, **kw) if layout == "legacy" else LAB.release(V2, **kw)
    with Device(dev_dir, clock=lambda: LAB.now) as dev:
        assert dev.boot().version == "1.0.0"  # the layout-1 factory manifest boots
        assert dev.install(MemoryTransport(env, V2)).version == "2.0.0"
    _confirm(dev_dir, "2.0.0")


def test_field_device_installs_a_legacy_delta_then_a_current_one(dev_dir: Path) -> None:
    patch = create_patch(V1, V2)
    kw = {"version": "2.0.0", "seq": 2, "counter": 2}
    old = legacy_envelope(LAB.info(V2, delta=_delta_info(V1, patch), **kw), [LAB.op])
    with Device(dev_dir, clock=lambda: LAB.now) as dev:
        dev.boot()
        assert dev.install(MemoryTransport(old, b"", patch=patch)).method == "delta"
    _confirm(dev_dir, "2.0.0")
    v3 = image_bytes(21_000, 3)
    p3 = create_patch(V2, v3)
    new = LAB.delta_release(V2, v3, p3, version="3.0.0", seq=3, counter=2)
    with Device(dev_dir, clock=lambda: LAB.now) as dev:
        dev.boot()
        assert dev.install(MemoryTransport(new, b"", patch=p3)).method == "delta"
    _confirm(dev_dir, "3.0.0")


def test_legacy_release_is_checked_like_any_other(dev_dir: Path) -> None:
    """The device's checks run on ManifestInfo: a layout-1 replay is refused the same way."""
    stale = _legacy_release(V2, version="0.9.0", seq=1, counter=1)
    with Device(dev_dir, clock=lambda: LAB.now) as dev:
        dev.boot()
        with pytest.raises(OtaError) as e:
            dev.install(MemoryTransport(stale, V2))
    current = LAB.release(V2, version="0.9.0", seq=1, counter=1)
    with Device(dev_dir, clock=lambda: LAB.now) as dev:
        dev.boot()
        with pytest.raises(OtaError) as e2:
            dev.install(MemoryTransport(current, V2))
    assert e.value.code == e2.value.code


def _delta_info(base: bytes, patch: bytes) -> Any:
    import hashlib

    from otaguard.manifest.model import DeltaInfo

    return DeltaInfo(
        hashlib.sha256(base).digest(), hashlib.sha256(patch).digest(), len(patch), None
    )
