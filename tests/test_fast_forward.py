"""Fast-forward (G4): a stolen CI credential or signing key must not be able to burn an absurd
security counter / sequence number into devices and lock them out of all later releases."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from otaguard.device.device import Device
from otaguard.device.lab import Lab, MemoryTransport, image_bytes
from otaguard.device.layout import LayoutConfig
from otaguard.errors import ErrorCode, OtaError
from otaguard.manifest.conditions import (
    MAX_SECURITY_COUNTER,
    MAX_SEQUENCE,
    DeviceFacts,
    check_applicable,
)
from otaguard.signing.policy import LastRelease, Policy, check_request
from tests.test_signing_policy import CI, NOW, POLICY, SO, req

LAST = LastRelease("1.4.0", 5, 100)


def refused(code: ErrorCode, *args: object) -> None:
    with pytest.raises(OtaError) as exc:
        check_request(*args)  # type: ignore[arg-type]
    assert exc.value.code == code, exc.value


def test_counter_step_is_bounded_for_ci() -> None:
    check_request(POLICY, req(version="1.5.0", security_counter=5 + 16), CI, LAST, NOW)
    refused(
        ErrorCode.FAST_FORWARD, POLICY, req(version="1.5.0", security_counter=22), CI, LAST, NOW
    )
    refused(
        ErrorCode.FAST_FORWARD,
        POLICY,
        req(version="1.5.0", security_counter=2**64 - 1),
        CI,
        LAST,
        NOW,
    )


def test_major_version_jump_is_bounded_for_ci() -> None:
    check_request(POLICY, req(version="2.0.0", security_counter=5), CI, LAST, NOW)
    refused(ErrorCode.FAST_FORWARD, POLICY, req(version="3.0.0", security_counter=5), CI, LAST, NOW)
    refused(
        ErrorCode.FAST_FORWARD, POLICY, req(version="99999.0.0", security_counter=5), CI, LAST, NOW
    )


def test_fast_forward_needs_a_security_officer_and_a_sane_counter() -> None:
    big = req(version="9.0.0", security_counter=1000, fast_forward=True)
    refused(ErrorCode.FORBIDDEN, POLICY, big, CI, LAST, NOW)
    check_request(POLICY, big, SO, LAST, NOW)
    # without the flag even an officer is refused
    refused(ErrorCode.FAST_FORWARD, POLICY, replace(big, fast_forward=False), SO, LAST, NOW)
    # beyond what any device accepts: never, even with authorization, even as a first release
    absurd = req(version="9.0.0", security_counter=MAX_SECURITY_COUNTER + 1, fast_forward=True)
    refused(ErrorCode.FAST_FORWARD, POLICY, absurd, SO, LAST, NOW)
    refused(ErrorCode.FAST_FORWARD, POLICY, absurd, SO, None, NOW)


def test_steps_are_configurable_and_validated() -> None:
    doc = {"version": 1, "requesters": {}, "max_counter_step": 2, "max_major_step": 0}
    p = Policy.from_json(json.dumps(doc).encode())
    assert (p.max_counter_step, p.max_major_step) == (2, 0)
    for bad in ({"max_counter_step": 0}, {"max_major_step": -1}, {"max_counter_step": True}):
        with pytest.raises(OtaError) as exc:
            Policy.from_json(json.dumps({**doc, **bad}).encode())
        assert exc.value.code == ErrorCode.MALFORMED


def test_fast_forward_flag_round_trips_and_is_not_a_release_field() -> None:
    from otaguard.signing.policy import SigningRequest

    r = req(fast_forward=True)
    assert SigningRequest.from_dict(r.to_dict()).fast_forward is True
    assert "fast_forward" not in r.release_fields()


# --- device side -------------------------------------------------------------------------------

CFG = LayoutConfig(sector_size=4096, page_size=256, slot_size=12 * 4096, manifest_size=4096)
V1 = image_bytes(10_000, 1)
V2 = image_bytes(12_000, 2)


@pytest.mark.parametrize(
    ("counter", "seq"),
    [(MAX_SECURITY_COUNTER + 1, 6), (2**64 - 1, 6), (3, MAX_SEQUENCE + 1), (3, 2**64 - 1)],
    ids=["counter-2^32", "counter-max", "seq-2^40", "seq-max"],
)
def test_device_refuses_absurd_counter_or_sequence(tmp_path: Path, counter: int, seq: int) -> None:
    """Signed by the device's own trusted key (a stolen key), yet refused before download."""
    lab = Lab()
    d = tmp_path / "dev"
    with lab.provision(d, V1, cfg=CFG, version="1.0.0", seq=5, counter=3) as dev:
        dev.boot()
    t = MemoryTransport(lab.release(V2, version="1.1.0", seq=seq, counter=counter), V2)
    with Device(d, clock=lambda: lab.now) as dev:
        with pytest.raises(OtaError) as exc:
            dev.install(t)
        assert exc.value.code == ErrorCode.FAST_FORWARD
        assert dev.storage.counters().security == 3
    assert not t.offsets  # not one image byte requested
    # the bounds themselves are still accepted
    info = lab.info(V2, version="1.1.0", seq=MAX_SEQUENCE, counter=MAX_SECURITY_COUNTER)
    check_applicable(info, DeviceFacts(lab.vendor_id, lab.class_id, "1.0.0", 3, 5, None))


# --- the sequence number follows the signing host's clock -----------------------------------------
YEAR = 366 * 86400


def test_sequence_step_is_bounded_unless_a_security_officer_fast_forwards() -> None:
    from otaguard.signing.policy import MAX_SIGNED_SEQUENCE, check_sequence

    last = NOW
    assert check_sequence(POLICY, last, NOW - 50, False) == last + 1  # clock behind: +1
    assert check_sequence(POLICY, last, NOW + 4 * YEAR, False) == NOW + 4 * YEAR  # a long gap
    with pytest.raises(OtaError) as exc:
        check_sequence(POLICY, last, NOW + 6 * YEAR, False)  # a clock years ahead
    assert exc.value.code == ErrorCode.FAST_FORWARD and "check the clock" in exc.value.detail
    assert check_sequence(POLICY, last, NOW + 6 * YEAR, True) == NOW + 6 * YEAR
    assert check_sequence(POLICY, 0, NOW + 60 * YEAR, False) == NOW + 60 * YEAR  # first ever
    for prev in (0, last):  # beyond 2106: never, whoever authorizes it
        with pytest.raises(OtaError) as exc:
            check_sequence(POLICY, prev, MAX_SIGNED_SEQUENCE + 1, True)
        assert exc.value.code == ErrorCode.FAST_FORWARD
    tight = replace(POLICY, max_sequence_step_days=1)
    check_sequence(tight, last, last + 86400, False)
    with pytest.raises(OtaError):
        check_sequence(tight, last, last + 86401, False)


def test_service_refuses_a_release_from_a_clock_years_ahead(tmp_path: Path) -> None:
    """Through the signing service: the refusal is audited, nothing is issued, and a
    security officer's fast-forward signs it."""
    from otaguard.signing.audit import read_records
    from tests.test_signing_service import CI as SCI
    from tests.test_signing_service import SO as SSO
    from tests.test_signing_service import Env, make_request

    env = Env(tmp_path)
    first = env.service.sign_release(make_request(version="1.0.0"), SCI)
    env.clock += 6 * YEAR
    ahead = make_request(version="1.1.0", security_counter=2, expires=int(env.clock) + 86400)
    with pytest.raises(OtaError) as exc:
        env.service.sign_release(ahead, SCI)
    assert exc.value.code == ErrorCode.FAST_FORWARD
    with env.service.state.transaction() as tx:
        assert tx.last_sequence() == first.sequence  # nothing issued
    refusals = [r for r in read_records(env.service.audit.path) if r.op == "sign-refused"]
    assert [r.subject["error"] for r in refusals] == [ErrorCode.FAST_FORWARD.value]
    signed = env.service.sign_release(replace(ahead, fast_forward=True), SSO)
    assert signed.sequence == int(env.clock)
    env.service.close()


def test_sequence_step_is_configurable_and_validated() -> None:
    doc = {"version": 1, "requesters": {}, "max_sequence_step_days": 30}
    assert Policy.from_json(json.dumps(doc).encode()).max_sequence_step_days == 30
    for bad in (0, -1, True, "30"):
        with pytest.raises(OtaError) as exc:
            Policy.from_json(json.dumps({**doc, "max_sequence_step_days": bad}).encode())
        assert exc.value.code == ErrorCode.MALFORMED
