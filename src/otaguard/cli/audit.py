"""``otaguard audit verify|show``: check and read the signing audit log."""

from __future__ import annotations

import datetime as dt
import json
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from ..crypto.keys import PublicKey
from ..errors import AuditError, ErrorCode, UsageError
from ..fsutil import read_limited
from ..signing.audit import AuditHead, read_records, verify_log
from ..signing.audit_key import audit_key, seal_window_check
from ..signing.state import SigningState
from ..trust.documents import MAX_AUTHORIZATION

MAX_PEM = 16 * 1024


@click.group()
def audit() -> None:
    """Verify and inspect the hash-chained, sealed signing audit log."""


def _iso(t: int) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat().replace("+00:00", "Z")


@audit.command("verify")
@click.argument("log", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--seal-authorization",
    "authorizations",
    type=click.Path(dir_okay=False, path_type=Path),
    multiple=True,
    help="Root-signed audit-key authorization ('keys authorize-audit'); needs --root-public. "
    "Repeat for rotated keys.",
)
@click.option(
    "--root-public",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The fleet's root public key (PEM) the authorizations are checked against.",
)
@click.option(
    "--key",
    "keys",
    type=click.Path(dir_okay=False, path_type=Path),
    multiple=True,
    help="A bare seal public key (PEM) whose role nobody vouched for; prefer "
    "--seal-authorization. Repeat for rotated keys.",
)
@click.option(
    "--allow-unsealed-tail",
    is_flag=True,
    help="A live log: report records after the last seal as a warning, not an error.",
)
@click.option("--expect-head", metavar="SEQ:SHA256", help="Out-of-band anchor the log must hold.")
@click.option(
    "--state",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="Signing state DB whose recorded audit head is used as the anchor.",
)
@click.option(
    "--server-db-url",
    metavar="URL",
    help="Update-server database whose rotation history anchors a rotation audit log.",
)
@click.option(
    "--server-data-dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Same, for a server on its default SQLite database in this data directory.",
)
@click.option(
    "--unanchored",
    is_flag=True,
    help="Check chain and seals without an anchor (cannot detect truncation back to a seal).",
)
@click.option("--json", "as_json", is_flag=True)
def verify_cmd(
    log: Path,
    authorizations: tuple[Path, ...],
    root_public: Path | None,
    keys: tuple[Path, ...],
    allow_unsealed_tail: bool,
    expect_head: str | None,
    state: Path | None,
    server_db_url: str | None,
    server_data_dir: Path | None,
    unanchored: bool,
    as_json: bool,
) -> None:
    """Check every hash link and seal of LOG against an anchor; exit 1 naming the first bad
    record.

    A log can be cut back to an earlier seal and still verify on its own, so OK needs an anchor
    kept outside the log: --expect-head, the signing service's --state, or the server's rotation
    history (--server-db-url / --server-data-dir). --unanchored checks the rest and says so.
    """
    trusted, check_key = _seal_keys(authorizations, root_public, keys)
    sources = [x for x in (expect_head, state, server_db_url, server_data_dir) if x]
    if len(sources) > 1:
        raise UsageError(ErrorCode.USAGE, "give one anchor source, not several")
    if unanchored and sources:
        raise UsageError(ErrorCode.USAGE, "--unanchored contradicts the anchor given")
    if not sources and not unanchored:
        raise AuditError(
            ErrorCode.AUDIT_ANCHOR,
            "no anchor: a log truncated back to a seal verifies on its own; give "
            "--expect-head, --state or --server-db-url/--server-data-dir (or --unanchored)",
        )
    anchor = _anchor(expect_head, state, server_db_url, server_data_dir)
    if sources and anchor is None:
        raise AuditError(ErrorCode.AUDIT_ANCHOR, "the anchor source holds no audit head yet")
    try:
        report = verify_log(
            log,
            trusted,
            allow_unsealed_tail=allow_unsealed_tail,
            expect_head=anchor,
            check_seal_key=check_key,
        )
    except AuditError as err:
        if as_json:
            click.echo(
                json.dumps(
                    {"valid": False, "error": err.code.value, "record": err.record,
                     "detail": err.detail},
                    sort_keys=True,
                )
            )  # fmt: skip
            click.get_current_context().exit(1)
        raise
    out: dict[str, Any] = {
        "valid": True,
        "anchored": anchor is not None,
        "anchor": str(anchor) if anchor is not None else None,
        **report.to_dict(),
    }
    if as_json:
        click.echo(json.dumps(out, indent=2, sort_keys=True))
        return
    verdict = f"OK (anchored at {anchor})" if anchor is not None else "OK (UNANCHORED)"
    click.echo(
        f"{verdict}: {report.records} records, {report.seals} seals, head {report.head}, "
        f"sealed by {', '.join(report.seal_key_ids) or 'nobody'}"
    )
    if anchor is None:
        click.echo("WARNING: no anchor: truncation back to a seal would not be detected", err=True)
    for w in report.warnings:
        click.echo(f"WARNING {ErrorCode.AUDIT_SEAL.value}: {w}", err=True)


def _seal_keys(
    authorizations: tuple[Path, ...], root_public: Path | None, keys: tuple[Path, ...]
) -> tuple[list[PublicKey], Callable[[PublicKey, int], None] | None]:
    if authorizations and root_public is None:
        raise UsageError(ErrorCode.USAGE, "--seal-authorization needs --root-public")
    if not authorizations and not keys:
        raise UsageError(ErrorCode.USAGE, "give --seal-authorization (with --root-public) or --key")
    trusted = [PublicKey.from_pem(read_limited(k, MAX_PEM)) for k in keys]
    check = None
    if authorizations:
        assert root_public is not None
        root = PublicKey.from_pem(read_limited(root_public, MAX_PEM))
        audit_keys = [audit_key(read_limited(a, MAX_AUTHORIZATION), root) for a in authorizations]
        trusted += [k.key for k in audit_keys]
        check = seal_window_check(audit_keys)
    return trusted, check


def _anchor(
    expect_head: str | None,
    state: Path | None,
    server_db_url: str | None,
    server_data_dir: Path | None,
) -> AuditHead | None:
    if expect_head:
        return AuditHead.parse(expect_head)
    if state is not None:
        st = SigningState(state)
        try:
            head, _ = st.snapshot()
        finally:
            st.close()
        return head
    if server_db_url or server_data_dir:
        from ..server.admin_api.rotation import audit_anchor
        from ..server.storage.db import Database, sqlite_url

        url = server_db_url or sqlite_url((server_data_dir or Path(".")) / "otaguard.db")
        db = Database(url)
        try:
            with db.read() as conn:
                return audit_anchor(conn)
        finally:
            db.dispose()
    return None


def _subject_summary(op: str, s: dict[str, Any]) -> str:
    if op == "sign-manifest":
        return (
            f"{s.get('vendor')} {s.get('model')}/{s.get('hw_rev')} {s.get('version')} "
            f"seq={s.get('sequence')} ctr={s.get('security_counter')} "
            f"img={str(s.get('image_digest', ''))[:16]}…"
            + (" DOWNGRADE" if s.get("downgrade") else "")
        )
    if op == "sign-mcuboot":
        return (
            f"{s.get('model')}/{s.get('hw_rev')} {s.get('version')} MCUboot "
            f"{s.get('mcuboot_version')} seq={s.get('sequence')} ctr={s.get('security_counter')} "
            f"kid={s.get('key_id')}"
        )
    if op == "seal":
        return f"records {s.get('first')}..{s.get('last')} kid={s.get('kid')}"
    if op == "sign-refused":
        return f"{s.get('error')} {s.get('model')}/{s.get('hw_rev')} {s.get('version')}"
    if op == "cosign-request":
        return (
            f"{s.get('request')} {s.get('model')}/{s.get('hw_rev')} {s.get('version')} "
            f"needs {s.get('threshold')} digest={str(s.get('request_digest', ''))[:16]}…"
        )
    if op == "cosign-approve":
        return (
            f"{s.get('request')} approval {s.get('approval')}/{s.get('threshold')} "
            f"kid={s.get('kid')} digest={str(s.get('request_digest', ''))[:16]}…"
        )
    if op == "cosign-refused":
        return f"{s.get('error')} {s.get('request')}"
    return json.dumps(s, sort_keys=True)[:100]


@audit.command("show")
@click.argument("log", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--op", "ops", multiple=True, help="Only records with this operation.")
@click.option("--json", "as_json", is_flag=True)
def show_cmd(log: Path, ops: tuple[str, ...], as_json: bool) -> None:
    """List LOG's records. UNVERIFIED: run `audit verify` to check chain and seals."""
    if not log.exists():
        raise AuditError(ErrorCode.NOT_FOUND, f"{log} does not exist")
    records = [r for r in read_records(log) if not ops or r.op in ops]
    if as_json:
        click.echo(json.dumps({"verified": False, "records": [r.to_dict() for r in records]},
                              indent=2, sort_keys=True))  # fmt: skip
        return
    click.echo("# UNVERIFIED listing; use `otaguard audit verify` to check it", err=True)
    for r in records:
        line = (f"{r.seq:>6}  {_iso(r.time)}  {r.actor:<16}  {r.op:<14}  "
                f"{_subject_summary(r.op, r.subject)}")  # fmt: skip
        click.echo(terminal_safe(line))


def terminal_safe(text: str) -> str:
    """Requester-supplied fields reach this listing: every control or format character (C0,
    DEL, C1, line/paragraph separators, bidi overrides) is shown as an escape, and a backslash
    as two, so a record can neither erase, recolour or fake lines on the operator's terminal
    nor pass for an escape it is not."""
    out = []
    for ch in text:
        if ch == "\\":
            out.append("\\\\")
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):
            n = ord(ch)
            out.append(
                f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}" if n < 0x10000 else f"\\U{n:08x}"
            )
        else:
            out.append(ch)
    return "".join(out)
