"""Admin bearer tokens expire on the server clock (threat 4.11), on SQLite and PostgreSQL."""

# ruff: noqa: F811  (pytest fixtures imported from tests.pg are redefined as parameters)
from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from alembic import command
from sqlalchemy import func, insert, select

from otaguard.cli.main import main
from otaguard.clock import SimClock
from otaguard.errors import ErrorCode, OtaError, ServerError
from otaguard.server.storage import models as m
from otaguard.server.storage import store
from otaguard.server.storage.db import Database
from tests.pg import Harness, db_url, fleet_ca, hx, pg_cluster, server_tls  # noqa: F401

T0 = 1_900_000_000
DAY = 86400


@pytest.fixture
def clock() -> Iterator[SimClock]:
    """The store's clock (the one ``token_role`` checks against), moved by hand."""
    c = SimClock(T0)
    prev = store.set_clock(c)
    try:
        yield c
    finally:
        store.set_clock(prev)


def new_token(db: Database, name: str, role: str, valid_for: int | None) -> str:
    with db.write() as conn:
        return store.create_token(conn, name, role, valid_for=valid_for)


def bearer(h: Harness, token: str) -> httpx.Client:
    return h.client(None, headers={"Authorization": f"Bearer {token}"})


# --- over HTTP -----------------------------------------------------------------------------------
def test_token_refused_once_expired(
    hx: Harness, clock: SimClock, caplog: pytest.LogCaptureFixture
) -> None:
    token = new_token(hx.db, "laptop-op", "viewer", 3600)
    c = bearer(hx, token)
    assert c.get("/admin/v1/devices").status_code == 200
    clock.set(T0 + 3599)  # last second of its life
    assert c.get("/admin/v1/devices").status_code == 200
    clock.set(T0 + 3600)
    with caplog.at_level(logging.WARNING, logger="otaguard.server.storage.store"):
        r = c.get("/admin/v1/devices")
    assert r.status_code == 401
    assert r.json() == {"error": ErrorCode.AUTH.value, "detail": "token expired"}
    assert any(
        rec.levelno == logging.WARNING and "laptop-op" in rec.getMessage() for rec in caplog.records
    )
    # A write with the expired token is refused just the same, and nothing is revoked.
    r = c.post("/admin/v1/devices/nope/revoke")
    assert r.status_code == 401 and r.json()["error"] == ErrorCode.AUTH.value
    # A fresh token, minted at the new time, works: expiry is per token.
    fresh = bearer(hx, new_token(hx.db, "laptop-op-2", "viewer", 3600))
    assert fresh.get("/admin/v1/devices").status_code == 200


def test_token_without_expiry_keeps_working(hx: Harness, clock: SimClock) -> None:
    c = bearer(hx, new_token(hx.db, "break-glass", "viewer", None))
    clock.advance(20 * 365 * DAY)
    assert c.get("/admin/v1/devices").status_code == 200


def test_unknown_and_revoked_tokens_still_plain_401(hx: Harness, clock: SimClock) -> None:
    token = new_token(hx.db, "gone", "viewer", 3600)
    with hx.db.write() as conn:
        conn.execute(
            m.admin_tokens.update().where(m.admin_tokens.c.name == "gone").values(revoked=True)
        )
    for t in (token, "otg_" + "A" * 43):
        r = bearer(hx, t).get("/admin/v1/devices")
        assert r.status_code == 401
        assert r.json() == {"error": ErrorCode.AUTH.value, "detail": "unknown or revoked token"}


# --- store ---------------------------------------------------------------------------------------
def test_store_expiry_boundary_and_default(db_url: str, clock: SimClock) -> None:
    db = Database(db_url)
    try:
        db.upgrade()
        default = new_token(db, "default", "operator", store.DEFAULT_TOKEN_LIFETIME)
        with db.read() as conn:
            assert store.token_expiry(conn, "default") == T0 + 90 * DAY
            assert store.token_role(conn, default) == ("default", "operator")
        with db.write() as conn:  # the keyword's default is the 90-day lifetime too
            implicit = store.create_token(conn, "implicit", "viewer")
            assert store.token_expiry(conn, "implicit") == T0 + 90 * DAY
        clock.set(T0 + 90 * DAY - 1)
        with db.read() as conn:
            assert store.token_role(conn, implicit) == ("implicit", "viewer")
        clock.set(T0 + 90 * DAY)
        for tok in (default, implicit):
            with db.read() as conn, pytest.raises(ServerError) as ei:
                store.token_role(conn, tok)
            assert ei.value.code == ErrorCode.AUTH and ei.value.status == 401
            assert ei.value.detail == "token expired"
        with db.read() as conn:
            assert store.token_role(conn, "otg_unknown") is None
    finally:
        db.dispose()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_store_refuses_nonpositive_lifetime(db_url: str) -> None:
    db = Database(db_url)
    try:
        db.upgrade()
        for bad in (0, -1):
            with db.write() as conn, pytest.raises(OtaError) as ei:
                store.create_token(conn, f"bad{bad}", "viewer", valid_for=bad)
            assert ei.value.code == ErrorCode.USAGE
        with db.read() as conn:
            assert conn.execute(select(func.count()).select_from(m.admin_tokens)).scalar() == 0
            with pytest.raises(OtaError) as ei:
                store.token_expiry(conn, "bad0")
            assert ei.value.code == ErrorCode.NOT_FOUND
    finally:
        db.dispose()


# --- CLI -----------------------------------------------------------------------------------------
def cli(
    capsys: pytest.CaptureFixture[str], url: str, tmp: Path, *args: str
) -> tuple[int, str, str]:
    rc = main(["server", "token-create", "--data-dir", str(tmp), "--db", url, *args])
    out, err = capsys.readouterr()
    return rc, out, err


def rows(url: str) -> dict[str, tuple[int, int | None]]:
    db = Database(url)
    try:
        with db.read() as conn:
            t = m.admin_tokens
            return {
                r.name: (r.created_at, r.expires_at)
                for r in conn.execute(select(t.c.name, t.c.created_at, t.c.expires_at))
            }
    finally:
        db.dispose()


def test_cli_token_create_expiry(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = int(time.time())
    rc, out, err = cli(capsys, db_url, tmp_path, "--name", "ops-a", "--role", "operator")
    assert rc == 0, err
    token = out.splitlines()[0]
    assert token.startswith("otg_") and len(out.splitlines()) == 1
    assert "expires at 20" in err and "ops-a" in err
    created, expires = rows(db_url)["ops-a"]
    assert before <= created <= int(time.time())
    assert expires == created + 90 * DAY

    rc, out, err = cli(
        capsys, db_url, tmp_path, "--name", "ci-12h", "--role", "viewer", "--valid-for", "12h"
    )
    assert rc == 0, err
    created, expires = rows(db_url)["ci-12h"]
    assert expires == created + 12 * 3600

    rc, out, err = cli(
        capsys, db_url, tmp_path, "--name", "glass", "--role", "security-officer", "--no-expiry"
    )
    assert rc == 0, err
    assert out.splitlines()[0].startswith("otg_")
    assert "never expires" in err
    assert rows(db_url)["glass"][1] is None

    # The printed token is the one that authenticates (on the real clock: not expired).
    db = Database(db_url)
    try:
        with db.read() as conn:
            assert store.token_role(conn, token) == ("ops-a", "operator")
    finally:
        db.dispose()


@pytest.mark.parametrize(
    "extra",
    [
        ["--valid-for", "90x"],
        ["--valid-for", "0d"],
        ["--valid-for", "3651d"],
        ["--valid-for", ""],
        ["--valid-for", "30d", "--no-expiry"],
    ],
)
@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_cli_token_create_usage_errors(
    db_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str]
) -> None:
    rc, _, _ = cli(capsys, db_url, tmp_path, "--name", "first", "--role", "viewer")
    assert rc == 0
    rc, out, err = cli(capsys, db_url, tmp_path, "--name", "second", "--role", "viewer", *extra)
    assert rc == 2
    assert out == ""
    assert err.startswith(f"otaguard: error {ErrorCode.USAGE.value}: ") and err.count("\n") == 1
    assert set(rows(db_url)) == {"first"}


# --- migration -----------------------------------------------------------------------------------
def test_migration_0005_keeps_existing_tokens(db_url: str, clock: SimClock) -> None:
    """A database at 0004 with a token: after the upgrade the token has no expiry and works."""
    import hashlib

    db = Database(db_url)
    try:
        with db.write() as conn:
            command.upgrade(db._alembic_config(conn), "0004_key_rotation")
        assert db.current_revision() == "0004_key_rotation"
        old = "otg_" + "x" * 43
        with db.write() as conn:
            conn.execute(
                insert(m.admin_tokens).values(
                    name="pre-0005",
                    token_sha256=hashlib.sha256(old.encode()).hexdigest(),
                    role="security-officer",
                    created_at=T0 - 400 * DAY,
                    revoked=False,
                )
            )
        assert db.upgrade() == db.head_revision()
        clock.advance(10 * 365 * DAY)
        with db.read() as conn:
            assert store.token_role(conn, old) == ("pre-0005", "security-officer")
            assert store.token_expiry(conn, "pre-0005") is None
        # Downgrade drops the column (the token survives), and upgrading again works.
        with db.write() as conn:
            command.downgrade(db._alembic_config(conn), "0004_key_rotation")
        with db.read() as conn:
            n = conn.execute(select(func.count()).select_from(m.admin_tokens)).scalar()
            assert n == 1
        db.upgrade()
        with db.read() as conn:
            assert store.token_role(conn, old) == ("pre-0005", "security-officer")
    finally:
        db.dispose()


# --- list and revoke -----------------------------------------------------------------------------
def test_revoked_token_refused_on_the_next_request(hx: Harness, clock: SimClock) -> None:
    """A stolen laptop's token: revoked while the server runs, refused from the next request
    on (tokens are looked up per request, nothing is cached)."""
    token = new_token(hx.db, "stolen-laptop", "operator", 30 * DAY)
    c = bearer(hx, token)
    assert c.get("/admin/v1/devices").status_code == 200
    with hx.db.write() as conn:
        assert store.revoke_token(conn, "stolen-laptop") is True
    r = c.get("/admin/v1/devices")
    assert r.status_code == 401
    assert r.json() == {"error": ErrorCode.AUTH.value, "detail": "unknown or revoked token"}
    with hx.db.write() as conn:
        assert store.revoke_token(conn, "stolen-laptop") is False  # already revoked
        with pytest.raises(OtaError) as ei:
            store.revoke_token(conn, "no-such-token")
        assert ei.value.code == ErrorCode.NOT_FOUND
    other = bearer(hx, new_token(hx.db, "desk", "viewer", 30 * DAY))
    assert other.get("/admin/v1/devices").status_code == 200  # only that token


def run_cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(["server", *args])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_cli_token_list_and_revoke(
    db_url: str, tmp_path: Path, clock: SimClock, capsys: pytest.CaptureFixture[str]
) -> None:
    where = ("--data-dir", str(tmp_path), "--db", db_url)
    secrets_shown: list[str] = []
    for name, life in (("ops", "90d"), ("ci", "10d"), ("short", "12h")):
        rc, out, err = run_cli(capsys, "token-create", "--name", name, "--role", "operator",
                               "--valid-for", life, *where)  # fmt: skip
        assert rc == 0, err
        secrets_shown.append(out.splitlines()[0])
    rc, out, err = run_cli(capsys, "token-create", "--name", "glass", "--role", "viewer",
                           "--no-expiry", *where)  # fmt: skip
    assert rc == 0, err
    secrets_shown.append(out.splitlines()[0])
    rc, out, err = run_cli(capsys, "token-revoke", "--name", "ops", *where)
    assert (rc, out.strip()) == (0, "revoked admin token 'ops'"), err
    rc, out, err = run_cli(capsys, "token-revoke", "--name", "ops", *where)
    assert (rc, out.strip()) == (0, "'ops' was already revoked")
    clock.set(T0 + DAY)  # "short" (12 h) has expired; "ci" (10 d) expires within 14 days

    rc, out, err = run_cli(capsys, "token-list", "--json", *where)
    assert rc == 0, err
    tokens = {t["name"]: t for t in json.loads(out)["tokens"]}
    assert {n: t["state"] for n, t in tokens.items()} == {
        "ops": "revoked",
        "ci": "expiring",
        "short": "expired",
        "glass": "active",
    }
    assert tokens["ci"]["expires_at"] == T0 + 10 * DAY and tokens["glass"]["expires_at"] is None
    assert "'ci' expires at" in err and "short" not in err  # a warning for the expiring one
    rc, table, _ = run_cli(capsys, "token-list", *where)
    assert rc == 0 and table.splitlines()[0].split() == [
        "NAME", "ROLE", "CREATED", "EXPIRES", "STATE"
    ]  # fmt: skip
    # never a token or its hash, in either form
    db = Database(db_url)
    try:
        with db.read() as conn:
            hashes = [r[0] for r in conn.execute(select(m.admin_tokens.c.token_sha256))]
    finally:
        db.dispose()
    for secret in secrets_shown + hashes:
        assert secret not in out and secret not in table

    rc, out, err = run_cli(capsys, "token-revoke", "--name", "nobody", *where)
    assert rc != 0 and out == ""
    assert err.startswith(f"otaguard: error {ErrorCode.NOT_FOUND.value}: ") and err.count("\n") == 1
