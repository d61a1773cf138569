"""``otaguard release publish|list|show``: releases on the update server (admin API).

Kept apart from ``release create`` (cli/release.py), which signs offline and never talks to
the update server: these commands only upload what ``create`` wrote and read back what the
server holds. Token from ``$OTAGUARD_ADMIN_TOKEN``.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import click

from .admin_options import admin_options, connect
from .common import emit
from .release import release


def _when(t: int | None) -> str:
    if t is None:
        return "never"
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M")


@release.command("publish")
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@admin_options
def publish(directory: Path, server: str | None, ca_file: Path | None, as_json: bool) -> None:
    """Upload a `release create` output DIRECTORY: image, manifest and every delta.

    Idempotent: what the server already holds (same manifest digest) is skipped, so a re-run
    never fails or duplicates. Needs a release-manager or security-officer token.
    """
    from ..release_publish import publish_release

    with connect(server, ca_file) as client:
        out = publish_release(client, directory)

    def text(d: dict[str, Any]) -> str:
        verb = "published" if d["created"] else "already published"
        lines = [f"{verb}: release {d['release_id']} {d['model']}/{d['hw_rev']} {d['version']}"]
        for x in d["deltas"]:
            verb = "uploaded" if x["created"] else "already there"
            lines.append(f"  delta {x['id']} from {x['base_version'] or '?'}: {verb}")
        return "\n".join(lines)

    emit(out.as_dict(), as_json, text)


@release.command("list")
@click.option("--model")
@click.option("--hw-rev")
@admin_options
def list_(
    model: str | None, hw_rev: str | None, server: str | None, ca_file: Path | None, as_json: bool
) -> None:
    """Releases on the server (id, model, version, counter, signers)."""
    with connect(server, ca_file) as client:
        out = client.list_releases(model=model, hw_rev=hw_rev)

    def text(rs: list[dict[str, Any]]) -> str:
        rows = [f"{'ID':>5} {'MODEL':<16} {'HW':<8} {'VERSION':<12} {'CTR':>4} CREATED"]
        rows += [
            f"{r['id']:>5} {r['model']:<16} {r['hw_rev']:<8} {r['version']:<12} "
            f"{r['security_counter']:>4} {_when(r['created_at'])}"
            for r in rs
        ]
        return "\n".join(rows) if rs else "no releases"

    emit({"releases": out} if as_json else out, as_json, text)


@release.command("show")
@click.argument("release_id", type=int)
@admin_options
def show(release_id: int, server: str | None, ca_file: Path | None, as_json: bool) -> None:
    """One release on the server, with its deltas (E_NOT_FOUND for an unknown id)."""
    with connect(server, ca_file) as client:
        out = client.release(release_id)

    def text(r: dict[str, Any]) -> str:
        lines = [
            f"release {r['id']}: {r['model']}/{r['hw_rev']} {r['version']} "
            f"(security counter {r['security_counter']}, sequence {r['sequence_number']})",
            f"  manifest  {r['manifest_digest']}",
            f"  image     {r['image_size']} bytes",
            f"  signers   {', '.join(r['signers'])}",
            f"  expires   {_when(r['expires'])}",
            f"  uploaded  {_when(r['created_at'])} by {r['uploaded_by'] or '-'}",
        ]
        for d in r.get("deltas", []):
            lines.append(
                f"  delta {d['id']} from {d['base_version'] or '?'} "
                f"(base {d['base_digest'][:16]}…): {d['patch_size']} bytes"
            )
        return "\n".join(lines)

    emit(out, as_json, text)
