"""MCUboot images: built by otaguard, checked by MCUboot's own imgtool (and by our parser)."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otaguard.crypto.cose import Signer
from otaguard.crypto.pkcs11 import Pkcs11Signer, generate_keypair
from otaguard.crypto.software import SoftwareSigner, generate_private_key
from otaguard.errors import ErrorCode, OtaError
from otaguard.mcuboot.image import (
    DEFAULT_TRAILER,
    MAX_UNPROTECTED_SIZE,
    PROTECTED_SIZE,
    Geometry,
    ImageVersion,
    parse_image,
    sign_image,
    verify_image,
)

from .conftest import SoftHsmToken
from .mcuboot_support import (
    assert_imgtool_accepts,
    assert_imgtool_refuses,
    imgtool_dumpinfo,
    sec_cnt_of,
)

KINDS = ["ed25519", "p256"]


def _soft(kind: str) -> SoftwareSigner:
    return SoftwareSigner(generate_private_key(kind))  # type: ignore[arg-type]


def _code(e: pytest.ExceptionInfo[OtaError]) -> ErrorCode:
    return e.value.code


def _build(tmp: Path, signer: Signer, version: str = "1.2.3", counter: int = 7) -> Path:
    image = os.urandom(3000) + b"firmware"
    data = sign_image(
        image, ImageVersion.from_release(version), counter, signer, Geometry(slot_size=65536)
    )
    path = tmp / f"img-{signer.public_key.key_id.hex()}.bin"
    path.write_bytes(data)
    return path


def _check_with_imgtool(tmp: Path, signer: Signer) -> None:
    path = _build(tmp, signer, "2.5.300.9", 41)
    assert_imgtool_accepts(path, signer.public_key)
    info = imgtool_dumpinfo(path)  # imgtool's own parser reads our fields back
    assert info["header"]["version"] == "2.5.300+9"
    assert sec_cnt_of(info) == 41
    assert info["header"]["protected_tlv_size"] == PROTECTED_SIZE
    assert [t["type_name"] for t in info["tlv_area"]["tlvs"]] == [
        "SHA256",
        "KEYHASH",
        "ED25519" if signer.public_key.kind == "ed25519" else "ECDSASIG",
    ]
    # a wrong key (same kind) is refused by imgtool
    assert_imgtool_refuses(path, _soft(signer.public_key.kind).public_key)
    # tampering: a payload byte, the protected SEC_CNT, the signature
    data = path.read_bytes()
    v = verify_image(data, [signer.public_key])
    sig_off = len(data) - len(v.parsed.signature)
    sec_off = v.parsed.header_size + v.parsed.image_size + 8
    for name, off in (("payload", 32 + 100), ("sec_cnt", sec_off), ("signature", sig_off + 5)):
        bad = bytearray(data)
        bad[off] ^= 0x01
        bad_path = tmp / f"bad-{name}-{path.name}"
        bad_path.write_bytes(bytes(bad))
        out = assert_imgtool_refuses(bad_path, signer.public_key)
        want = "No signature found" if name == "signature" else "invalid hash"
        assert want in out, (name, out)
        with pytest.raises(OtaError) as e:
            verify_image(bytes(bad), [signer.public_key])
        assert _code(e) == (ErrorCode.SIGNATURE if name == "signature" else ErrorCode.DIGEST)


@pytest.mark.parametrize("kind", KINDS)
def test_imgtool_verifies_software_key_images(tmp_path: Path, kind: str) -> None:
    _check_with_imgtool(tmp_path, _soft(kind))


@pytest.mark.softhsm
@pytest.mark.parametrize("kind", KINDS)
def test_imgtool_verifies_pkcs11_key_images(
    tmp_path: Path, softhsm_token: SoftHsmToken, kind: str
) -> None:
    t = softhsm_token
    generate_keypair(t.uri(), "mcu", kind, pin=t.pin, module=t.module)  # type: ignore[arg-type]
    with Pkcs11Signer.open(t.uri("mcu"), pin=t.pin, module=t.module) as signer:
        _check_with_imgtool(tmp_path, signer)


def test_our_verifier_reports_what_was_signed() -> None:
    s = _soft("ed25519")
    image = b"\x5a" * 1000
    data = sign_image(image, ImageVersion.from_release("3.1"), 9, s, Geometry(header_size=0x200))
    v = verify_image(data, [_soft("p256").public_key, s.public_key])
    assert v.key == s.public_key
    assert (v.version, v.security_counter) == (ImageVersion(3, 1, 0, 0), 9)
    assert bytes(v.parsed.image) == image
    assert v.parsed.tlv_overhead == 0x200 + PROTECTED_SIZE + 144
    with pytest.raises(OtaError) as e:
        verify_image(data, [_soft("ed25519").public_key])
    assert _code(e) == ErrorCode.UNTRUSTED_KEY
    with pytest.raises(OtaError) as e:
        verify_image(data, [s.public_key], max_size=len(data) - 1)
    assert _code(e) == ErrorCode.TOO_LARGE
    with pytest.raises(OtaError) as e:  # trailing bytes are not part of our layout
        verify_image(data + b"\xff", [s.public_key])
    assert _code(e) == ErrorCode.MALFORMED


@pytest.mark.parametrize(
    "version",
    ["256.0.0", "1.256.0", "1.2.65536", "1.2.3.4.5"],
)
def test_version_that_does_not_fit_is_refused(version: str) -> None:
    with pytest.raises(OtaError) as e:
        ImageVersion.from_release(version)
    assert _code(e) == ErrorCode.FIELD_RANGE


def test_version_mapping() -> None:
    assert ImageVersion.from_release("255.255.65535.4294967295") == ImageVersion(
        255, 255, 65535, 4294967295
    )
    assert str(ImageVersion.from_release("1")) == "1.0.0+0"
    with pytest.raises(OtaError) as e:
        ImageVersion.from_release("1.2.3-rc1")
    assert _code(e) == ErrorCode.MALFORMED


def test_counter_and_slot_bounds_refused_before_signing() -> None:
    class Refuse:
        public_key = _soft("ed25519").public_key
        alg = None

        def sign(self, data: bytes) -> bytes:
            raise AssertionError("must not be asked to sign")

    signer: Signer = Refuse()  # type: ignore[assignment]
    v = ImageVersion(1)
    with pytest.raises(OtaError) as e:
        sign_image(b"x" * 10, v, 2**32, signer, Geometry())
    assert _code(e) == ErrorCode.FIELD_RANGE
    size = 4096
    exact = 32 + size + PROTECTED_SIZE + MAX_UNPROTECTED_SIZE + DEFAULT_TRAILER
    assert Geometry(slot_size=exact).check_fits(size) == exact
    with pytest.raises(OtaError) as e:
        sign_image(b"x" * size, v, 1, signer, Geometry(slot_size=exact - 1))
    assert _code(e) == ErrorCode.SLOT_FULL
    with pytest.raises(OtaError) as e:
        sign_image(b"x" * 10, v, 1, signer, Geometry(header_size=16))
    assert _code(e) == ErrorCode.FIELD_RANGE


_P256 = _soft("p256")
_SIGNED = sign_image(b"\x00\x11" * 300, ImageVersion(1, 2, 3), 5, _P256, Geometry())


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.data())
def test_parser_mutations_never_crash_and_never_verify(data: st.DataObject) -> None:
    """Any flipped/truncated/extended image is refused with a code, never another exception."""
    key = _P256.public_key
    assert verify_image(_SIGNED, [key]).security_counter == 5
    buf = bytearray(_SIGNED)
    op = data.draw(st.sampled_from(["flip", "truncate", "extend"]))
    if op == "flip":
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] ^= data.draw(st.integers(1, 255))
    elif op == "truncate":
        del buf[data.draw(st.integers(0, len(buf) - 1)) :]
    else:
        buf += data.draw(st.binary(min_size=1, max_size=16))
    try:
        verify_image(bytes(buf), [key])
    except OtaError:
        return
    raise AssertionError("a modified image verified")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400))
def test_parser_on_arbitrary_bytes(blob: bytes) -> None:
    with contextlib.suppress(OtaError):
        parse_image(blob)
