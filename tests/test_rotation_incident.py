"""The incident, end to end over the real server and real mTLS: key A is declared compromised
on the day a security patch must ship.

A fleet of simulated devices on key A (some intermittently offline, two gone for the whole
window) polls a running update server through :class:`~otaguard.device.updater.Updater`; the
security officer drives ``otaguard rotation start/status/advance/finish`` (the real CLI, over
the admin API's TLS listener); simulated hours come from a SimClock shared by devices and
server. Printed: the timeline and the numbers docs/operations.md quotes.
"""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from otaguard.adminclient import TOKEN_ENV, AdminClient, AdminError
from otaguard.cli.main import cli
from otaguard.clock import SimClock
from otaguard.crypto.software import SoftwareSigner, generate_private_key
from otaguard.device.device import Device
from otaguard.device.https_transport import HttpsTransport
from otaguard.device.lab import Lab, MemoryTransport, image_bytes
from otaguard.device.layout import LayoutConfig
from otaguard.device.updater import Updater, install_identity, write_identity_files
from otaguard.errors import ErrorCode, OtaError
from otaguard.server.context import ServerSettings, TrustState
from otaguard.server.pki.ca import FleetCA
from otaguard.server.pki.enroll import Enrollment
from otaguard.server.ratelimit import RateLimit
from otaguard.server.storage import store
from tests.pg import Harness, db_url, fleet_ca, harness, pg_cluster, server_tls  # noqa: F401

N = 20
HOUR = 3600
CFG = LayoutConfig(slot_size=64 * 1024, manifest_size=4096)
V1 = image_bytes(16_000, 1)
PATCH = image_bytes(18_000, 7)
INTERMITTENT = {16, 17}  # online on even hours only
GONE = {18, 19}  # offline from the declaration until the very end


def token(h: Harness, role: str) -> str:
    with h.db.write() as conn:
        return store.create_token(conn, f"{role}-{os.urandom(3).hex()}", role)


def admin(h: Harness, role: str) -> httpx.Client:
    return h.client(None, headers={"Authorization": f"Bearer {token(h, role)}"})


def upload(h: Harness, envelope: bytes, image: bytes) -> int:
    """Publish through the typed admin client, as the release pipeline does."""
    rm = AdminClient(admin(h, "release-manager"))
    return rm.create_release(envelope, rm.upload_blob(image)["blob"])["id"]


class Officer:
    """Runs ``otaguard rotation ...`` exactly as the runbook says (CLI → admin API over TLS)."""

    def __init__(self, h: Harness, tmp: Path, role: str = "security-officer") -> None:
        assert h.admin_server is not None
        ca = str(h.tmp / "tls" / "ca.pem")
        self.base = ["rotation", "--server", h.admin_server.url, "--ca-file", ca]
        self.env = {TOKEN_ENV: token(h, role)}
        self.tmp = tmp

    def __call__(self, *args: str) -> Any:
        r = CliRunner().invoke(cli, [*self.base, *args], env=self.env, catch_exceptions=True)
        if r.exception is not None and not isinstance(r.exception, SystemExit):
            assert isinstance(r.exception, OtaError), r.exception
            return r.exception.code
        assert r.exit_code == 0, r.output
        return json.loads(r.output) if "--json" in args else r.output


def new_key() -> SoftwareSigner:
    return SoftwareSigner(generate_private_key("ed25519"))


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_incident_key_compromise_rotation_and_patch(
    db_url: str,
    fleet_ca: FleetCA,
    server_tls: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    lab = Lab()
    key_a = lab.op
    sim = SimClock(lab.now)
    monkeypatch.setattr(store, "now_s", lambda: int(sim.now()))
    trust = TrustState(lab.bundle.store())
    sealer = new_key()  # the server's audit-sealing key (an HSM key in production)
    settings = ServerSettings(
        ca_cert=fleet_ca.cert,
        device_rate=RateLimit(rate=1000.0, burst=1000),
        ip_rate=RateLimit(rate=10000.0, burst=10000),
        audit_sealer=sealer,
    )
    with harness(db_url, fleet_ca, server_tls, tmp_path, trust=trust, settings=settings) as h:
        fleet: list[Updater] = []
        enrollments: list[Enrollment] = []
        for i in range(N):
            e = h.enroll(f"SN-{i:02d}", model=lab.model, hw_rev=lab.hw_rev)
            dev = lab.provision(
                tmp_path / "dev" / str(i), V1, cfg=CFG, checkpoint=8192,
                clock=lambda: int(sim.now()),
            )  # fmt: skip
            t = HttpsTransport(
                h.url, ca_file=e.ca_path, cert_file=e.cert_path, key_file=e.key_path,  # type: ignore[arg-type]
                sleep=lambda _s: None, max_attempts=1,
            )  # fmt: skip
            fleet.append(Updater(dev, t, clock=sim))
            enrollments.append(e)
        for up in fleet:  # the fleet as it was the day before: everyone checked in
            assert up.poll_once().outcome == "idle"

        def online(i: int, hour: int) -> bool:
            if i in GONE:
                return False
            return i not in INTERMITTENT or hour % 2 == 0

        hour = 0
        timeline: list[str] = []

        def tick() -> list[Any]:
            nonlocal hour
            sim.advance(HOUR)
            hour += 1
            return [up.poll_once() for i, up in enumerate(fleet) if online(i, hour)]

        def note(what: str) -> None:
            timeline.append(f"T+{hour:>2}h  {what}")

        # --- T+0: key A declared compromised; B authorized (root-signed) and published ---
        note("key A declared compromised")
        key_b = new_key()
        start_list = tmp_path / "keylist-v2.cose"
        start_list.write_bytes(lab.keylist_update([key_b]))
        officer = Officer(h, tmp_path)
        a_kid, b_kid = key_a.public_key.key_id.hex(), key_b.public_key.key_id.hex()
        started = officer(
            "start", "--keylist", str(start_list), "--old-kid", a_kid, "--new-kid", b_kid,
            "--unreachable-hours", "1", "--reason", "INC-42: key A suspected compromised",
            "--json",
        )  # fmt: skip
        assert started["state"] == "started"
        note("rotation start: key list v2 (A+B, root-signed) published")
        results = tick()
        assert all(r.keylist_version == 2 for r in results)
        st = officer("status", "--json")
        assert st["on_new_list"] == N - len(GONE) - len(INTERMITTENT)
        assert not st["threshold_met"]
        note(f"{st['on_new_list']}/{N} devices on v2 ({st['fraction']:.0%})")
        # below 97 %: advance refused, even for the release manager; forced by the officer
        assert Officer(h, tmp_path, "release-manager")("advance") == ErrorCode.ROTATION_PENDING
        assert officer("advance", "--force") == ErrorCode.USAGE  # no reason given
        tick()  # the intermittent ones come back at T+2h
        st = officer("status", "--json")
        assert st["on_new_list"] == N - len(GONE) and st["unreachable_count"] == len(GONE)
        adv = officer("advance", "--force", "--reason", "INC-42: patch must ship today", "--json")
        assert adv["forced"] and adv["release_kid"] == b_kid
        note(f"advance forced at {st['fraction']:.0%}: releases now signed with key B")
        # --- the security patch, signed with B; A-signed uploads refused from now on ---
        stale = lab.release(PATCH, version="1.1.0", seq=6, counter=2)  # signed with A
        with pytest.raises(AdminError) as refused:
            upload(h, stale, PATCH)
        assert (refused.value.status, refused.value.code) == (409, ErrorCode.KEY_RETIRED)
        patch = lab.release(PATCH, version="1.1.0", seq=6, counter=2, signers=[key_b])
        rid = upload(h, patch, PATCH)
        op = AdminClient(admin(h, "operator"))
        for i in range(N):
            op.assign(f"SN-{i:02d}", rid)
        note("security patch 1.1.0 (signed with B) assigned to the fleet")
        # --- finish: A removed and revoked (root-signed v3); the gone devices still lag ---
        final_list = tmp_path / "keylist-v3.cose"
        final_list.write_bytes(
            lab.keylist_update([key_b], keep_op=False, revoked=[key_a.public_key.key_id])
        )
        assert officer("finish", "--keylist", str(final_list)) == ErrorCode.ROTATION_PENDING
        fin = officer(
            "finish", "--keylist", str(final_list), "--force",
            "--reason", "INC-42: revoke A now", "--json",
        )  # fmt: skip
        assert fin["keylist_version"] == 3
        note("finish forced: key list v3 (B only, A revoked) published")
        reachable = [i for i in range(N) if i not in GONE]
        patched_at: dict[int, int] = {}
        for _ in range(6):
            tick()
            for i in reachable:
                if i not in patched_at and fleet[i].facts()["version"] == "1.1.0":
                    patched_at[i] = hour
            if len(patched_at) == len(reachable):
                break
        assert len(patched_at) == len(reachable)
        for i in reachable:
            assert fleet[i].device.bootloader.trust().version == 3
        note(f"patch confirmed on all {len(reachable)} reachable devices")
        report = officer("status")
        print("\n" + report)
        st = officer("status", "--json")
        assert [d["serial"] for d in st["unreachable"]] == [f"SN-{i}" for i in sorted(GONE)]
        assert {d["keylist_version"] for d in st["unreachable"]} == {1}
        assert [h_["forced"] for h_ in st["history"]] == [False, True, True]
        assert st["expiry_warnings"] == []  # B is valid ~300 more days
        warn = officer("status", "--warn-days", "400", "--json")["expiry_warnings"]
        assert [w["kid"] for w in warn] == [b_kid] and 290 < warn[0]["days_left"] < 300
        # every action is in the audit log, chained, and matches the DB history
        from otaguard.server.admin_api.rotation import audit_anchor
        from otaguard.signing.audit import read_records, verify_log

        log = h.srv.rotation_audit  # type: ignore[attr-defined]
        with h.db.read() as conn:
            anchor = audit_anchor(conn)
        assert anchor is not None
        # sealed after every action by the server's audit key, and anchored in the database
        rep = verify_log(log.path, [sealer.public_key], expect_head=anchor)
        assert rep.seals == 3 and rep.seal_key_ids == [sealer.public_key.key_id.hex()]
        recs = {r.seq: r for r in read_records(log.path)}
        for ev in st["history"]:
            assert recs[ev["audit_seq"]].hash == ev["audit_hash"]
            assert recs[ev["audit_seq"]].op == f"rotation-{ev['action']}"
        # an insider cuts the log back to an earlier seal: it still verifies on its own, but
        # not against the database's anchor
        cut = tmp_path / "cut.log"
        lines = log.path.read_bytes().splitlines(keepends=True)
        cut.write_bytes(b"".join(lines[: st["history"][1]["audit_seq"] + 2]))
        assert verify_log(cut, [sealer.public_key]).seals == 2
        with pytest.raises(OtaError) as cut_err:
            verify_log(cut, [sealer.public_key], expect_head=anchor)
        assert cut_err.value.code is ErrorCode.AUDIT_SEAL
        # and a seal by any other key (say, a release key) is refused
        with pytest.raises(OtaError) as other:
            verify_log(log.path, [key_a.public_key], expect_head=anchor)
        assert other.value.code is ErrorCode.AUDIT_SEAL
        # the CLI takes the same anchor from the server's database
        seal_pem = tmp_path / "seal.pub.pem"
        seal_pem.write_bytes(sealer.public_key.to_pem())
        for path, ok in ((log.path, True), (cut, False)):
            res = CliRunner().invoke(
                cli, ["audit", "verify", str(path), "--key", str(seal_pem),
                      "--server-db-url", db_url],
            )  # fmt: skip
            assert (res.exit_code == 0) is ok, res.output
            assert ("OK (anchored at" in res.output) is ok
        # --- the gone devices come back: v3 is root-signed, so they recover on their own ---
        for i in GONE:
            r = fleet[i].poll_once()
            assert (r.keylist_from, r.keylist_version, r.outcome) == (1, 3, "confirmed")
        note(f"stragglers {sorted(f'SN-{i}' for i in GONE)} back: v1 -> v3, patched")
        # --- afterwards a manifest signed with A is refused everywhere ---
        late = lab.release(image_bytes(9_000, 9), version="1.2.0", seq=9, counter=2)
        with pytest.raises(AdminError) as refused:
            upload(h, late, image_bytes(9_000, 9))
        assert (refused.value.status, refused.value.code) == (400, ErrorCode.KEY_REVOKED)
        for up in fleet:
            with pytest.raises(OtaError) as exc:
                up.device.install(MemoryTransport(late, image_bytes(9_000, 9)))
            assert exc.value.code in (ErrorCode.KEY_REVOKED, ErrorCode.UNTRUSTED_KEY)
            assert up.device.boot().version == "1.1.0"
        note(f"A-signed manifest refused by all {N} devices")
        last = max(patched_at.values())
        print("\nincident timeline (simulated):\n" + "\n".join(timeline))
        print(
            f"declaration -> patch on every reachable device: {last} h; "
            f"median {sorted(patched_at.values())[len(patched_at) // 2]} h; "
            f"{len(reachable)}/{N} reachable, {len(GONE)} unreachable (recovered later)"
        )
        for up in fleet:
            up.device.close()
            up.transport.close()  # type: ignore[attr-defined]


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_reenrolled_device_picks_up_new_identity(
    db_url: str, fleet_ca: FleetCA, server_tls: Path, tmp_path: Path
) -> None:
    lab = Lab()
    with harness(db_url, fleet_ca, server_tls, tmp_path, trust=TrustState(lab.bundle.store())) as h:
        old = h.enroll("SN-R1", model=lab.model, hw_rev=lab.hw_rev)
        assert old.key_path is not None
        dev = lab.provision(tmp_path / "dev", V1, cfg=CFG)
        install_identity(dev, old.key_path.read_bytes(), old.cert_path.read_bytes())

        def transport(d: Device, n: int) -> HttpsTransport:
            cert, key = write_identity_files(d, tmp_path / f"id{n}")
            return HttpsTransport(
                h.url, ca_file=old.ca_path, cert_file=cert, key_file=key,
                sleep=lambda _s: None, max_attempts=1,
            )  # fmt: skip

        t1 = transport(dev, 1)
        assert Updater(dev, t1).poll_once().outcome == "idle"
        new = h.enroll("SN-R1", model=lab.model, hw_rev=lab.hw_rev, replace=True)
        r = Updater(dev, t1).poll_once()
        assert (r.outcome, r.error) == ("unreachable", "E_CERT_REVOKED")
        assert new.key_path is not None
        install_identity(dev, new.key_path.read_bytes(), new.cert_path.read_bytes())
        dev.close()
        with Device(tmp_path / "dev") as dev2:  # reboot: the identity survives in storage
            t2 = transport(dev2, 2)
            assert Updater(dev2, t2).poll_once().outcome == "idle"
            with h.db.read() as conn:
                row = store.device_by_serial(conn, "SN-R1")
                assert row is not None and row.cert_fingerprint == new.cert.fingerprint
            t2.close()
        t1.close()
