"""``otaguard fleet devices|device|groups|set-groups|assign``: the fleet as the server sees it.

These go through the admin API (token in ``$OTAGUARD_ADMIN_TOKEN``), unlike ``fleet init-ca`` /
``enroll`` / ``server-cert`` (cli/fleet.py), which need the CA key and run where it lives.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import click

from .admin_options import admin_options, connect
from .common import emit
from .fleet import fleet


def _when(t: int | None) -> str:
    if t is None:
        return "never"
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M")


@fleet.command("devices")
@click.option("--model")
@click.option("--hw-rev")
@click.option("--group")
@click.option("--version", "fw_version", help="Running firmware version.")
@click.option("--suspect/--not-suspect", default=None, help="Only (not) suspect devices.")
@click.option("--limit", type=click.IntRange(1, 1000), default=100, show_default=True)
@click.option("--offset", type=click.IntRange(0), default=0, show_default=True)
@admin_options
def devices(
    model: str | None,
    hw_rev: str | None,
    group: str | None,
    fw_version: str | None,
    suspect: bool | None,
    limit: int,
    offset: int,
    server: str | None,
    ca_file: Path | None,
    as_json: bool,
) -> None:
    """Devices, filtered; each with its version, key list, last check-in and last error."""
    with connect(server, ca_file) as client:
        out = client.list_devices(
            model=model,
            hw_rev=hw_rev,
            group=group,
            version=fw_version,
            suspect=suspect,
            limit=limit,
            offset=offset,
        )

    def text(d: dict[str, Any]) -> str:
        rows = [
            f"{'SERIAL':<20} {'MODEL':<12} {'HW':<8} {'VERSION':<10} {'KL':>3} "
            f"{'LAST SEEN':<16} {'ERROR':<18} FLAGS"
        ]
        for x in d["devices"]:
            flags = ",".join(
                f for f, on in (("revoked", x["revoked"]), ("suspect", x["suspect"])) if on
            )
            rows.append(
                f"{x['serial']:<20} {x['model']:<12} {x['hw_rev']:<8} "
                f"{x['current_version'] or '-':<10} {x['keylist_version'] or '-':>3} "
                f"{_when(x['last_seen']):<16} {x['last_error'] or '-':<18} {flags or '-'}"
            )
        rows.append(f"{len(d['devices'])} of {d['total']} device(s)")
        return "\n".join(rows)

    emit(out, as_json, text)


@fleet.command("device")
@click.argument("serial")
@admin_options
def device(serial: str, server: str | None, ca_file: Path | None, as_json: bool) -> None:
    """One device: check-in facts, last status report, assignment (E_NOT_FOUND if unknown)."""
    with connect(server, ca_file) as client:
        out = client.device(serial)

    def text(d: dict[str, Any]) -> str:
        lines = [
            f"device    {d['serial']}  {d['model']}/{d['hw_rev']}"
            + ("  REVOKED" if d["revoked"] else "")
            + (f"  SUSPECT ({d['suspect_reason']})" if d["suspect"] else ""),
            f"groups    {', '.join(d['groups']) or '-'}",
            f"running   {d['current_version'] or '-'} (counter {d['security_counter']}, "
            f"key list v{d['keylist_version']})",
            f"slots     {d['slot_state'] or '-'}",
            f"last seen {_when(d['last_seen'])}   last error {d['last_error'] or '-'}",
        ]
        r = d.get("last_report")
        if r:
            parts = [r["state"], r["version"], r["error_code"], f"at {_when(r['received_at'])}"]
            lines.append("report    " + " ".join(p for p in parts if p))
        else:
            lines.append("report    none yet")
        a = d.get("assignment")
        if a:
            via = f" (campaign {a['campaign_id']})" if a["campaign_id"] is not None else ""
            lines.append(f"assigned  release {a['release_id']}: {a['state']}{via}")
        return "\n".join(lines)

    emit(out, as_json, text)


@fleet.command("groups")
@admin_options
def groups(server: str | None, ca_file: Path | None, as_json: bool) -> None:
    """Device groups and their sizes."""
    with connect(server, ca_file) as client:
        out = client.list_groups()
    emit(
        {"groups": out} if as_json else out,
        as_json,
        lambda gs: "\n".join(f"{g['name']:<32} {g['devices']}" for g in gs) or "no groups",
    )


@fleet.command("set-groups")
@click.argument("serial")
@click.option("--group", "group_names", multiple=True, help="Group (repeatable; none: no group).")
@admin_options
def set_groups(
    serial: str,
    group_names: tuple[str, ...],
    server: str | None,
    ca_file: Path | None,
    as_json: bool,
) -> None:
    """Replace a device's groups (campaigns started later see the change)."""
    with connect(server, ca_file) as client:
        out = client.set_groups(serial, list(group_names))
    emit(out, as_json)


@fleet.command("set-class-format")
@click.option("--vendor", required=True, help="Vendor DNS domain.")
@click.option("--model", required=True)
@click.option("--hw-rev", required=True)
@click.option(
    "--format", "fmt", type=click.Choice(["suit", "mcuboot"]), required=True,
    help="mcuboot: devices of this class are offered the release's MCUboot image.",
)  # fmt: skip
@admin_options
def set_class_format(
    vendor: str,
    model: str,
    hw_rev: str,
    fmt: str,
    server: str | None,
    ca_file: Path | None,
    as_json: bool,
) -> None:
    """Choose the image format a device class is served (SUIT by default, or MCUboot)."""
    from ..manifest.ids import class_id, vendor_id

    cid = str(class_id(vendor_id(vendor), model, hw_rev))
    with connect(server, ca_file) as client:
        out = client.set_class_format(cid, fmt)
    emit(dict(out), as_json)


@fleet.command("assign")
@click.argument("serial")
@click.option("--release-id", type=int, required=True, help="Server id (`release list`).")
@admin_options
def assign(
    serial: str, release_id: int, server: str | None, ca_file: Path | None, as_json: bool
) -> None:
    """Offer one device a release directly, outside any campaign."""
    with connect(server, ca_file) as client:
        out = client.assign(serial, release_id)
    emit(out, as_json)
