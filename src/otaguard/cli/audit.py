"""``otaguard audit verify|show``: check and read the signing audit log."""

from __future__ import annotations

import datetime as dt
import json
import unicodedata
from pathlib import Path
from typing import Any

import click

from ..crypto.keys import PublicKey
from ..errors import AuditError, ErrorCode, UsageError
from ..fsutil import read_limited
from ..signing.audit import AuditHead, read_records, verify_log
from ..signing.state import SigningState

MAX_PEM = 16 * 1024


@click.group()
def audit() -> None:
    """Verify and inspect the hash-chained, sealed signing audit log."""


def _iso(t: int) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat().replace("+00:00", "Z")


@audit.command("verify")
@click.argument("log", type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--key",
    "keys",
    type=click.Path(dir_okay=False, path_type=Path),
    multiple=True,
    required=True,
    help="Trusted seal public key (PEM); repeat for rotated keys.",
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
@click.option("--json", "as_json", is_flag=True)
def verify_cmd(
    log: Path,
    keys: tuple[Path, ...],
    allow_unsealed_tail: bool,
    expect_head: str | None,
    state: Path | None,
    as_json: bool,
) -> None:
    """Check every hash link and seal of LOG; exit 1 naming the first bad record."""
    trusted = [PublicKey.from_pem(read_limited(k, MAX_PEM)) for k in keys]
    if expect_head and state:
        raise UsageError(ErrorCode.USAGE, "give --expect-head or --state, not both")
    anchor = AuditHead.parse(expect_head) if expect_head else None
    if state is not None:
        st = SigningState(state)
        try:
            anchor, _ = st.snapshot()
        finally:
            st.close()
    try:
        report = verify_log(
            log, trusted, allow_unsealed_tail=allow_unsealed_tail, expect_head=anchor
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
    out: dict[str, Any] = {"valid": True, **report.to_dict()}
    if as_json:
        click.echo(json.dumps(out, indent=2, sort_keys=True))
        return
    click.echo(
        f"OK: {report.records} records, {report.seals} seals, head {report.head}, "
        f"sealed by {', '.join(report.seal_key_ids) or 'nobody'}"
    )
    for w in report.warnings:
        click.echo(f"WARNING {ErrorCode.AUDIT_SEAL.value}: {w}", err=True)


def _subject_summary(op: str, s: dict[str, Any]) -> str:
    if op == "sign-manifest":
        return (
            f"{s.get('vendor')} {s.get('model')}/{s.get('hw_rev')} {s.get('version')} "
            f"seq={s.get('sequence')} ctr={s.get('security_counter')} "
            f"img={str(s.get('image_digest', ''))[:16]}…"
            + (" DOWNGRADE" if s.get("downgrade") else "")
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
