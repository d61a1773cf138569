"""``otaguard rotation``: drive a key rotation on the update server (docs/operations.md).

Talks to the server's admin API over TLS. The admin token comes from ``$OTAGUARD_ADMIN_TOKEN``
(never a command-line argument); the server's CA from ``--ca-file``. Key lists are made
offline with ``otaguard keys authorize`` / ``keys revoke`` and only uploaded here.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ..fsutil import read_limited
from ..trust.documents import MAX_KEYLIST
from .admin_options import CA_ENV, SERVER_ENV, connect
from .common import emit

if TYPE_CHECKING:
    from ..adminclient import AdminClient


def _client(ctx: click.Context) -> AdminClient:
    # --server is checked here (E_USAGE), not by click on the group: a required group option
    # made every `otaguard rotation <command> --help` fail without a server.
    return connect(ctx.obj["url"], ctx.obj["ca"])


def _keylist(path: Path) -> bytes:
    return read_limited(path, MAX_KEYLIST)


def _when(t: int | None) -> str:
    if t is None:
        return "never"
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M")


def _render_status(s: dict[str, Any]) -> str:
    lines = [
        f"rotation {s['id']}: {s['state']}  old {s['old_kid']} -> new {s['new_kid']}",
        f"  release key: {s['release_kid']}",
        f"  on key list v{s['start_keylist_version']}: {s['on_new_list']}/{s['targeted']} "
        f"({s['fraction']:.1%}, threshold {s['threshold']:.1%}"
        f"{', met' if s['threshold_met'] else ', NOT met'})",
    ]
    if s["final_keylist_version"]:
        lines.append(
            f"  on final list v{s['final_keylist_version']}: {s['on_final_list']}/{s['targeted']}"
        )
    for title, key in (("stragglers", "stragglers"), ("unreachable", "unreachable")):
        lines.append(
            f"  {title}: {s[key + '_count'] if key == 'unreachable' else s['straggler_count']}"
        )
        for d in s[key]:
            lines.append(
                f"    {d['serial']:<16} list v{d['keylist_version']}  last seen "
                f"{_when(d['last_seen'])}  last error {d['last_error'] or '-'}"
            )
    for w in s["expiry_warnings"]:
        lines.append(
            f"  WARNING: key {w['kid']} ({w['name'] or 'unnamed'}) expires in "
            f"{w['days_left']:.0f} days ({_when(w['not_after'])})"
        )
    for h in s["history"]:
        forced = f" FORCED: {h['reason']}" if h["forced"] else ""
        lines.append(
            f"  {_when(h['at'])} {h['action']:<8} by {h['actor']} at {h['fraction']:.1%}"
            f" (audit #{h['audit_seq']}){forced}"
        )
    return "\n".join(lines)


@click.group()
@click.option(
    "--server", "url", envvar=SERVER_ENV, help=f"Admin API URL [env {SERVER_ENV}] (required)."
)
@click.option(
    "--ca-file",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar=CA_ENV,
    help="CA certificate of the admin endpoint.",
)
@click.pass_context
def rotation(ctx: click.Context, url: str | None, ca_file: Path | None) -> None:
    """Key rotation: start, status, advance, finish (admin token in $OTAGUARD_ADMIN_TOKEN)."""
    ctx.obj = {"url": url, "ca": ca_file}


@rotation.command("start")
@click.option(
    "--keylist",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Key list that ADDS the new key (from `keys authorize`).",
)
@click.option("--old-kid", required=True)
@click.option("--new-kid", required=True)
@click.option("--threshold", type=click.FloatRange(0.01, 1.0), default=0.97, show_default=True)
@click.option("--unreachable-hours", type=click.IntRange(1, 10000), default=168, show_default=True)
@click.option("--model")
@click.option("--hw-rev")
@click.option("--group")
@click.option("--reason")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def start(
    ctx: click.Context,
    keylist: Path,
    old_kid: str,
    new_kid: str,
    threshold: float,
    unreachable_hours: int,
    model: str | None,
    hw_rev: str | None,
    group: str | None,
    reason: str | None,
    as_json: bool,
) -> None:
    """Publish the key list adding the new key and start tracking the fleet."""
    doc = _keylist(keylist)
    with _client(ctx) as client:
        out = client.start_rotation(
            doc,
            old_kid=old_kid,
            new_kid=new_kid,
            threshold=threshold,
            unreachable_after=unreachable_hours * 3600,
            model=model,
            hw_rev=hw_rev,
            group=group,
            reason=reason,
        )
    emit(out, as_json)


@rotation.command("status")
@click.option("--id", "rid", type=int, help="Rotation id (default: the latest).")
@click.option("--warn-days", type=click.IntRange(0, 3650), default=90, show_default=True)
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def status(ctx: click.Context, rid: int | None, warn_days: int, as_json: bool) -> None:
    """Fleet fraction on the new list, stragglers, unreachable devices, expiry warnings."""
    with _client(ctx) as client:
        out = client.rotation(rid or None, warn_days=warn_days)
    emit(out, as_json, _render_status)


def _step_options(func: Any) -> Any:
    func = click.option("--json", "as_json", is_flag=True)(func)
    func = click.option("--reason", help="Why (required with --force; audited).")(func)
    func = click.option(
        "--force", is_flag=True, help="Security officer: proceed below the threshold."
    )(func)
    return click.option("--id", "rid", type=int, help="Rotation id (default: the latest).")(func)


def _rid(client: AdminClient, rid: int | None) -> int:
    if rid is not None:
        return rid
    return int(client.rotation()["id"])


@rotation.command("advance")
@_step_options
@click.pass_context
def advance(
    ctx: click.Context, rid: int | None, force: bool, reason: str | None, as_json: bool
) -> None:
    """Switch new releases to the new key (refused below the threshold unless forced)."""
    with _client(ctx) as client:
        out = client.advance_rotation(_rid(client, rid), force=force, reason=reason)
    emit(out, as_json)


@rotation.command("finish")
@click.option(
    "--keylist",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    required=True,
    help="Final key list: old key removed and revoked (from `keys revoke`).",
)
@_step_options
@click.pass_context
def finish(
    ctx: click.Context,
    keylist: Path,
    rid: int | None,
    force: bool,
    reason: str | None,
    as_json: bool,
) -> None:
    """Publish the final key list that removes and revokes the old key."""
    doc = _keylist(keylist)
    with _client(ctx) as client:
        out = client.finish_rotation(_rid(client, rid), doc, force=force, reason=reason)
    emit(out, as_json)


@rotation.command("release-key")
@click.option("--json", "as_json", is_flag=True, help="Accepted for symmetry: always JSON.")
@click.pass_context
def release_key(ctx: click.Context, as_json: bool) -> None:
    """The key new releases must be signed with, and the retired ones (JSON)."""
    with _client(ctx) as client:
        out = client.release_key()
    click.echo(json.dumps(out, sort_keys=True))
