"""``otaguard campaign``: create and drive phased rollouts through the server's admin API.

The token comes from ``OTAGUARD_ADMIN_TOKEN`` (never the command line); the admin listener's
certificate is checked against ``--ca-file`` (the fleet CA), not the system trust store.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

import click

from ..adminclient import CampaignAction
from ..errors import ErrorCode, OtaError, UsageError
from ..fsutil import read_limited
from .admin_options import admin_options, connect
from .common import emit

MAX_SPEC = 1 << 20

_server_options = admin_options


def _summary(c: dict[str, Any]) -> str:
    counts = c.get("counts", {})
    phases = c["phases"]
    n_phases = len(phases) if isinstance(phases, list) else phases
    lines = [
        f"campaign   {c['id']}  ({c['status']})",
        f"release    {c['release']['version']} (id {c['release']['release_id']}) for "
        f"{c['release']['model']}:{c['release']['hw_rev']}",
        f"phase      {c['phase']}/{n_phases}  target {c.get('target_size', 0)}",
        "counts     " + " ".join(f"{k}={v}" for k, v in counts.items()),
    ]
    if c.get("pause_reason"):
        lines.append(f"paused     {c['pause_reason']}")
    sla = c.get("sla")
    if isinstance(sla, dict) and sla.get("status") != "none":
        lines.append(f"sla        {sla['status']} (remaining {sla['remaining']})")
    if c.get("stragglers"):
        lines.append(f"stragglers {', '.join(c['stragglers'][:20])}")
    return "\n".join(lines)


@click.group()
def campaign() -> None:
    """Phased rollouts on the update server (admin API)."""


@campaign.command("create")
@click.argument("campaign_id")
@click.option("--release-id", type=int, required=True, help="Server id of the release.")
@click.option(
    "--spec",
    "spec_file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="JSON file with CampaignSpec fields (selector, phases, failure, ...).",
)
@click.option("--model", help="selector.model (required unless in --spec)")
@click.option("--hw-rev", help="selector.hw_rev")
@click.option("--group", "groups", multiple=True, help="selector.groups (any of)")
@click.option("--device", "serials", multiple=True, help="selector.serials (explicit list)")
@click.option("--exclude", multiple=True, help="selector.exclude")
@click.option("--phase", "phases", multiple=True, type=float, help="Phase fraction, e.g. 0.1")
@click.option("--max-failed", type=int)
@click.option("--max-failed-fraction", type=float)
@click.option("--min-finished", type=int)
@click.option("--soak", "min_soak_s", type=float, help="Minimum seconds in each phase.")
@click.option("--deadline", type=float, help="SLA deadline (epoch seconds).")
@click.option("--name", help="Human-readable name.")
@_server_options
def create(
    campaign_id: str,
    release_id: int,
    spec_file: Path | None,
    model: str | None,
    hw_rev: str | None,
    groups: tuple[str, ...],
    serials: tuple[str, ...],
    exclude: tuple[str, ...],
    phases: tuple[float, ...],
    max_failed: int | None,
    max_failed_fraction: float | None,
    min_finished: int | None,
    min_soak_s: float | None,
    deadline: float | None,
    name: str | None,
    server: str | None,
    ca_file: Path | None,
    as_json: bool,
) -> None:
    """Create a DRAFT campaign (start it with `campaign start`)."""
    body: dict[str, Any] = {}
    if spec_file is not None:
        try:
            body = json.loads(read_limited(spec_file, MAX_SPEC))
        except ValueError:
            raise OtaError(ErrorCode.MALFORMED, f"{spec_file} is not JSON") from None
        if not isinstance(body, dict):
            raise OtaError(ErrorCode.MALFORMED, f"{spec_file} must hold a JSON object")
    sel = dict(body.get("selector") or {})
    for key, val in (("model", model), ("hw_rev", hw_rev)):
        if val is not None:
            sel[key] = val
    for key, vals in (("groups", groups), ("serials", serials), ("exclude", exclude)):
        if vals:
            sel[key] = list(vals)
    if "model" not in sel:
        raise UsageError(ErrorCode.USAGE, "give --model (or selector.model in --spec)")
    body.update(id=campaign_id, release_id=release_id, selector=sel)
    if phases:
        body["phases"] = [{"fraction": f} for f in phases]
    failure = dict(body.get("failure") or {})
    for key, v in (
        ("max_failed", max_failed),
        ("max_failed_fraction", max_failed_fraction),
        ("min_finished", min_finished),
    ):
        if v is not None:
            failure[key] = v
    if failure:
        body["failure"] = failure
    extra: dict[str, Any] = {"min_soak_s": min_soak_s, "deadline": deadline, "name": name}
    body.update({k: v for k, v in extra.items() if v is not None})
    with connect(server, ca_file) as client:
        out = client.create_campaign(body)
    emit(out, as_json, _summary)


def _action(action: CampaignAction) -> Any:
    @campaign.command(action)
    @click.argument("campaign_id")
    @click.option("--reason", help="Recorded in the campaign history.")
    @_server_options
    def cmd(
        campaign_id: str,
        reason: str | None,
        server: str | None,
        ca_file: Path | None,
        as_json: bool,
    ) -> None:
        with connect(server, ca_file) as client:
            out = client.campaign_action(campaign_id, action, reason)
        emit(out, as_json, _summary)

    cmd.__doc__ = f"{action.capitalize()} a campaign."
    return cmd


for _a in get_args(CampaignAction):
    _action(_a)


@campaign.command("status")
@click.argument("campaign_id")
@click.option("--stale-after", type=int, help="Seconds without check-in → straggler.")
@_server_options
def status(
    campaign_id: str,
    stale_after: int | None,
    server: str | None,
    ca_file: Path | None,
    as_json: bool,
) -> None:
    """Phase, counts per state, SLA, pause reason, stragglers."""
    with connect(server, ca_file) as client:
        out = client.campaign(campaign_id, stale_after=stale_after or None)
    emit(out, as_json, _summary)


@campaign.command("list")
@click.option(
    "--status",
    "status_filter",
    type=click.Choice(["draft", "running", "paused", "completed", "aborted"]),
)
@_server_options
def list_(
    status_filter: str | None, server: str | None, ca_file: Path | None, as_json: bool
) -> None:
    """Campaigns, newest first."""
    with connect(server, ca_file) as client:
        out = client.list_campaigns(status_filter)
    emit(
        out,
        as_json,
        lambda cs: (
            "\n".join(
                f"{c['id']:<24} {c['status']:<10} {c['release']['version']:<10} "
                f"phase {c['phase']}/{c['phases']}  succeeded {c['counts']['succeeded']}"
                f"/{c['target_size']}"
                for c in cs
            )
            or "no campaigns"
        ),
    )
