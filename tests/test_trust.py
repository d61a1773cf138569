"""Trust core: authorizations, key lists, key-list updates, resolver decisions."""

from __future__ import annotations

import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otaguard import cbor
from otaguard.crypto.algorithms import CoseAlg
from otaguard.crypto.software import SoftwareSigner, generate_private_key
from otaguard.errors import ErrorCode, OtaError
from otaguard.trust import (
    Role,
    Scope,
    TrustBundle,
    TrustStore,
    issue_authorization,
    sign_keylist,
)
from otaguard.trust.documents import MAX_VALIDITY_SECONDS, parse_authorization

T0 = 1_800_000_000
YEAR = 365 * 86400
VENDOR = uuid.uuid5(uuid.NAMESPACE_DNS, "hvac.example.com")
CLASS_A = uuid.uuid5(VENDOR, "ctl-9:rev-b")
CLASS_B = uuid.uuid5(VENDOR, "ctl-7:rev-a")


def signer(kind: str = "ed25519") -> SoftwareSigner:
    return SoftwareSigner(generate_private_key(kind))  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def _quiet_dev_key_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("ERROR", logger="otaguard.keys")


class Fleet:
    """A root, two operational keys, and helpers to issue documents at T0."""

    def __init__(self) -> None:
        self.root = signer()
        self.a = signer()
        self.b = signer("p256")
        self.version = 0

    def auth(
        self,
        key: SoftwareSigner,
        roles=(Role.FIRMWARE,),
        classes=(),
        issuer=None,
        nbf: int = T0 - 10,
        naf: int = T0 + YEAR,
    ) -> bytes:
        return issue_authorization(
            issuer or self.root,
            key.public_key,
            roles=frozenset(roles),
            scopes=[Scope(VENDOR, frozenset(classes))],
            not_before=nbf,
            not_after=naf,
            name="k",
        )

    def keylist(
        self,
        auths: list[bytes],
        *,
        by=None,
        version: int | None = None,
        revoked=frozenset(),
        threshold: int = 1,
        issued: int = T0,
    ) -> bytes:
        if version is None:
            self.version += 1
            version = self.version
        return sign_keylist(
            by or self.root,
            version=version,
            authorizations=auths,
            revoked=revoked,
            threshold=threshold,
            issued_at=issued,
        )

    def store(self, *auths: bytes, threshold: int = 1) -> TrustStore:
        return TrustStore.create(
            self.root.public_key, self.keylist(list(auths), threshold=threshold)
        )


def code_of(exc: pytest.ExceptionInfo[OtaError]) -> ErrorCode:
    return exc.value.code


def test_resolver_accepts_authorized_key_and_reports_its_scope() -> None:
    f = Fleet()
    store = f.store(f.auth(f.a, classes=[CLASS_A]))
    kid = f.a.public_key.key_id
    trusted = store.resolve(kid, CoseAlg.ED25519, Role.FIRMWARE, T0)
    assert trusted.key == f.a.public_key
    trusted.check_scope(VENDOR, CLASS_A)
    with pytest.raises(OtaError) as e:
        trusted.check_scope(VENDOR, CLASS_B)
    assert code_of(e) == ErrorCode.KEY_SCOPE
    with pytest.raises(OtaError) as e:
        trusted.check_scope(uuid.uuid4(), CLASS_A)
    assert code_of(e) == ErrorCode.KEY_SCOPE


def test_unknown_key_is_untrusted() -> None:
    f = Fleet()
    store = f.store(f.auth(f.a))
    with pytest.raises(OtaError) as e:
        store.resolve(f.b.public_key.key_id, CoseAlg.ESP256, Role.FIRMWARE, T0)
    assert code_of(e) == ErrorCode.UNTRUSTED_KEY


def test_key_outside_validity_is_refused_and_clock_rollback_does_not_help() -> None:
    f = Fleet()
    store = f.store(f.auth(f.a, nbf=T0 - 100, naf=T0 + 100), f.auth(f.b))
    kid = f.a.public_key.key_id
    with pytest.raises(OtaError) as e:
        store.resolve(kid, CoseAlg.ED25519, Role.FIRMWARE, T0 + 101)
    assert code_of(e) == ErrorCode.KEY_EXPIRED
    # A device that once verified a document issued late cannot be rolled back by its clock.
    later = store.observe_time(T0 + 500)
    with pytest.raises(OtaError) as e:
        later.resolve(kid, CoseAlg.ED25519, Role.FIRMWARE, 0)
    assert code_of(e) == ErrorCode.KEY_EXPIRED
    # The device's own clock running behind the newest document does not lower the bar.
    assert store.resolve(kid, CoseAlg.ED25519, Role.FIRMWARE, T0 - 10_000).key == f.a.public_key
    future = Fleet()
    store_f = future.store(
        future.auth(future.a), future.auth(future.b, nbf=T0 + 1000, naf=T0 + 2000)
    )
    with pytest.raises(OtaError) as e:
        store_f.resolve(future.b.public_key.key_id, CoseAlg.ESP256, Role.FIRMWARE, T0)
    assert code_of(e) == ErrorCode.KEY_EXPIRED


def test_role_and_algorithm_are_enforced() -> None:
    f = Fleet()
    store = f.store(f.auth(f.a))
    kid = f.a.public_key.key_id
    with pytest.raises(OtaError) as e:
        store.resolve(kid, CoseAlg.ED25519, Role.KEYLIST, T0)
    assert code_of(e) == ErrorCode.KEY_ROLE
    with pytest.raises(OtaError) as e:
        store.resolve(kid, CoseAlg.ESP256, Role.FIRMWARE, T0)
    assert code_of(e) == ErrorCode.ALGORITHM


def test_authorization_limits() -> None:
    f = Fleet()
    with pytest.raises(OtaError) as e:
        f.auth(f.a, nbf=T0, naf=T0 + MAX_VALIDITY_SECONDS + 1)
    assert code_of(e) == ErrorCode.KEY_EXPIRED
    with pytest.raises(OtaError) as e:
        f.auth(f.a, roles=())
    assert code_of(e) == ErrorCode.KEY_ROLE
    with pytest.raises(OtaError) as e:
        issue_authorization(
            f.root,
            f.root.public_key,
            roles={Role.FIRMWARE},
            scopes=[Scope(VENDOR)],
            not_before=T0,
            not_after=T0 + 10,
        )
    assert code_of(e) == ErrorCode.KEY_ROLE


def test_authorization_not_signed_by_root_is_refused() -> None:
    f = Fleet()
    rogue = f.auth(f.b, issuer=f.a)  # an operational key minting another key
    with pytest.raises(OtaError) as e:
        parse_authorization(rogue, {f.root.public_key.key_id: f.root.public_key})
    assert code_of(e) == ErrorCode.UNTRUSTED_KEY
    with pytest.raises(OtaError) as e:
        f.store(f.auth(f.a), rogue)
    assert code_of(e) == ErrorCode.UNTRUSTED_KEY


def test_authorization_with_forged_kid_issuer_fails_signature() -> None:
    f = Fleet()
    good = cbor.loads(f.auth(f.a))
    forged = f.auth(f.b, issuer=f.a)
    obj = cbor.loads(forged)
    obj.value[1] = good.value[1]  # claim the root's kid
    with pytest.raises(OtaError) as e:
        parse_authorization(cbor.dumps(obj), {f.root.public_key.key_id: f.root.public_key})
    assert code_of(e) == ErrorCode.SIGNATURE


def test_update_replay_and_equal_version_refused() -> None:
    f = Fleet()
    auth_a = f.auth(f.a)
    store = f.store(auth_a)  # version 1
    v2 = f.keylist([auth_a, f.auth(f.b)])  # version 2
    store2 = store.apply_update(v2, T0)
    assert store2.version == 2
    with pytest.raises(OtaError) as e:
        store2.apply_update(v2, T0)
    assert code_of(e) == ErrorCode.REPLAY
    with pytest.raises(OtaError) as e:
        store2.apply_update(f.keylist([auth_a], version=1), T0)
    assert code_of(e) == ErrorCode.REPLAY


def test_transition_mode_update_by_keylist_role_key() -> None:
    f = Fleet()
    auth_a = f.auth(f.a, roles=(Role.FIRMWARE, Role.KEYLIST))
    store = f.store(auth_a)
    auth_b = f.auth(f.b)
    # Old key A (keylist role) adds B: accepted.
    v2 = f.keylist([auth_a, auth_b], by=f.a)
    store2 = store.apply_update(v2, T0)
    assert store2.resolve(f.b.public_key.key_id, CoseAlg.ESP256, Role.FIRMWARE, T0)
    # ... but it cannot lower the threshold or un-revoke.
    store3 = store2.apply_update(f.keylist([auth_a, auth_b], threshold=2), T0)
    with pytest.raises(OtaError) as e:
        store3.apply_update(f.keylist([auth_a, auth_b], by=f.a, threshold=1), T0)
    assert code_of(e) == ErrorCode.THRESHOLD


def test_transition_mode_signer_cannot_unrevoke() -> None:
    f = Fleet()
    c = signer()
    auth_a = f.auth(f.a, roles=(Role.FIRMWARE, Role.KEYLIST))
    auth_b, auth_c = f.auth(f.b), f.auth(c)
    store = f.store(auth_a, auth_b, auth_c).apply_update(
        f.keylist([auth_a, auth_b], revoked={c.public_key.key_id}), T0
    )
    # A (keylist role) re-adds C and drops it from the revoked set: refused.
    with pytest.raises(OtaError) as e:
        store.apply_update(f.keylist([auth_a, auth_b, auth_c], by=f.a), T0)
    assert code_of(e) == ErrorCode.KEY_REVOKED
    # The root may (recovery after a mistaken revocation).
    restored = store.apply_update(f.keylist([auth_a, auth_b, auth_c]), T0)
    assert restored.resolve(c.public_key.key_id, CoseAlg.ED25519, Role.FIRMWARE, T0)


def test_update_signed_by_key_without_keylist_role_refused() -> None:
    f = Fleet()
    auth_a = f.auth(f.a)  # firmware only
    store = f.store(auth_a)
    with pytest.raises(OtaError) as e:
        store.apply_update(f.keylist([auth_a, f.auth(f.b)], by=f.a), T0)
    assert code_of(e) == ErrorCode.KEY_ROLE


def test_update_signed_by_revoked_key_refused() -> None:
    f = Fleet()
    auth_a = f.auth(f.a, roles=(Role.FIRMWARE, Role.KEYLIST))
    auth_b = f.auth(f.b)
    store = f.store(auth_a, auth_b).apply_update(
        f.keylist([auth_b], revoked={f.a.public_key.key_id}), T0
    )
    with pytest.raises(OtaError) as e:
        store.apply_update(f.keylist([auth_a, auth_b], by=f.a), T0)
    assert code_of(e) == ErrorCode.KEY_REVOKED
    with pytest.raises(OtaError) as e:
        store.resolve(f.a.public_key.key_id, CoseAlg.ED25519, Role.FIRMWARE, T0)
    assert code_of(e) == ErrorCode.KEY_REVOKED


def test_update_by_unknown_key_refused() -> None:
    f = Fleet()
    store = f.store(f.auth(f.a))
    with pytest.raises(OtaError) as e:
        store.apply_update(f.keylist([f.auth(f.a)], by=f.b), T0)
    assert code_of(e) == ErrorCode.UNTRUSTED_KEY


def test_update_adding_key_not_authorized_by_root_refused() -> None:
    f = Fleet()
    auth_a = f.auth(f.a, roles=(Role.FIRMWARE, Role.KEYLIST))
    store = f.store(auth_a)
    self_made = f.auth(f.b, issuer=f.a)
    with pytest.raises(OtaError) as e:
        store.apply_update(f.keylist([auth_a, self_made], by=f.a), T0)
    assert code_of(e) == ErrorCode.UNTRUSTED_KEY


def test_removing_last_usable_key_refused() -> None:
    f = Fleet()
    auth_a = f.auth(f.a)
    store = f.store(auth_a)
    with pytest.raises(OtaError) as e:
        store.apply_update(f.keylist([]), T0)
    assert code_of(e) == ErrorCode.EMPTY_KEYLIST
    with pytest.raises(OtaError) as e:
        store.apply_update(f.keylist([auth_a], revoked={f.a.public_key.key_id}), T0)
    assert code_of(e) == ErrorCode.EMPTY_KEYLIST
    # Only expired keys left is as empty as no keys at all.
    with pytest.raises(OtaError) as e:
        store.apply_update(f.keylist([f.auth(f.b, nbf=T0 - 1000, naf=T0 - 1)]), T0)
    assert code_of(e) == ErrorCode.EMPTY_KEYLIST


def test_threshold_above_usable_keys_refused() -> None:
    f = Fleet()
    with pytest.raises(OtaError) as e:
        f.store(f.auth(f.a), threshold=2)
    assert code_of(e) == ErrorCode.THRESHOLD


def test_tampered_keylist_signature_refused() -> None:
    f = Fleet()
    data = bytearray(f.keylist([f.auth(f.a)]))
    data[-5] ^= 0x01  # inside the signature
    with pytest.raises(OtaError) as e:
        TrustStore.create(f.root.public_key, bytes(data))
    assert code_of(e) == ErrorCode.SIGNATURE


def test_authorization_is_not_a_keylist() -> None:
    f = Fleet()
    with pytest.raises(OtaError) as e:
        TrustStore.create(f.root.public_key, f.auth(f.a))
    assert code_of(e) == ErrorCode.MALFORMED


def test_bundle_round_trip_and_tamper() -> None:
    f = Fleet()
    bundle = TrustBundle(f.root.public_key, f.keylist([f.auth(f.a)]))
    loaded = TrustBundle.load(bundle.to_bytes())
    assert loaded.root == f.root.public_key
    assert loaded.store().version == 1
    other = Fleet()
    swapped = TrustBundle(other.root.public_key, bundle.keylist)
    with pytest.raises(OtaError) as e:
        TrustBundle.load(swapped.to_bytes())
    assert code_of(e) in {ErrorCode.SIGNATURE, ErrorCode.UNTRUSTED_KEY}


def test_oversized_keylist_refused_before_parsing() -> None:
    f = Fleet()
    store = f.store(f.auth(f.a))
    with pytest.raises(OtaError) as e:
        store.apply_update(b"\xd2" + b"\x84" + b"\x00" * 70_000, T0)
    assert code_of(e) == ErrorCode.TOO_LARGE


_FLEET = Fleet()
_AUTH = _FLEET.auth(_FLEET.a)
_STORE = _FLEET.store(_AUTH)
_UPDATE = _FLEET.keylist([_AUTH, _FLEET.auth(_FLEET.b)])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_update_is_refused_with_a_code_or_identical(data: st.DataObject) -> None:
    raw = bytearray(_UPDATE)
    kind = data.draw(st.sampled_from(["flip", "truncate", "insert", "delete"]))
    pos = data.draw(st.integers(0, len(raw) - 1))
    if kind == "flip":
        raw[pos] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        del raw[pos:]
    elif kind == "insert":
        raw.insert(pos, data.draw(st.integers(0, 255)))
    else:
        del raw[pos]
    mutated = bytes(raw)
    try:
        new = _STORE.apply_update(mutated, T0)
    except OtaError as err:
        assert isinstance(err.code, ErrorCode)
        return
    assert mutated == _UPDATE
    assert new.version == 2


def test_keylist_version_fast_forward_is_bounded() -> None:
    """G4b: a keylist-role key (transition mode, possibly compromised) cannot push the version
    so far ahead that no later list fits; the root can jump, but not past the absolute bound."""
    from otaguard.trust.store import MAX_KEYLIST_STEP, MAX_KEYLIST_VERSION

    f = Fleet()
    auth_a = f.auth(f.a, roles=(Role.FIRMWARE, Role.KEYLIST))
    auth_b = f.auth(f.b)
    store = f.store(auth_a, auth_b)
    base = store.keylist.version
    # A step of exactly the bound is a device that missed many publications: accepted.
    stepped = store.apply_update(
        f.keylist([auth_a, auth_b], by=f.a, version=base + MAX_KEYLIST_STEP), T0
    )
    assert stepped.keylist.version == base + MAX_KEYLIST_STEP
    # One more, by the same keylist-role signer: refused, the store unchanged.
    with pytest.raises(OtaError) as e:
        store.apply_update(
            f.keylist([auth_a, auth_b], by=f.a, version=base + MAX_KEYLIST_STEP + 1), T0
        )
    assert code_of(e) == ErrorCode.FAST_FORWARD
    assert store.keylist.version == base
    # The root may jump (recovery), up to the absolute bound and not past it.
    top = store.apply_update(f.keylist([auth_a, auth_b], version=MAX_KEYLIST_VERSION), T0)
    assert top.keylist.version == MAX_KEYLIST_VERSION
    with pytest.raises(OtaError) as e:
        store.apply_update(f.keylist([auth_a, auth_b], version=MAX_KEYLIST_VERSION + 1), T0)
    assert code_of(e) == ErrorCode.FAST_FORWARD
    with pytest.raises(OtaError) as e:
        store.apply_update(f.keylist([auth_a, auth_b], version=2**63), T0)
    assert code_of(e) == ErrorCode.FAST_FORWARD
