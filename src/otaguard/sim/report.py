"""The simulation report: checks, text, JSON and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..fsutil import atomic_write
from .model import HOUR, time_to_fraction
from .runner import Simulation


def build_report(sim: Simulation, end: dict[str, Any], *, interrupted: bool) -> dict[str, Any]:
    o = sim.opts
    s = sim.stats
    reachable = [d for d in sim.devices if d.reached]
    t0 = sim.t0
    rel = [None if d.patched_at is None else (d.patched_at - t0) / HOUR for d in reachable]
    kl = [None if d.keylist_at is None else (d.keylist_at - t0) / HOUR for d in reachable]
    n = len(reachable)
    times = {f"t{p}_h": time_to_fraction(rel, p / 100, n) for p in (95, 99, 100)}
    kl_times = {f"t{p}_h": time_to_fraction(kl, p / 100, n) for p in (95, 99, 100)}
    not_patched = [d.files.serial for d in reachable if d.version != "1.1.0"]
    attacks = {k: dict(v) for k, v in s.attacks.items()}
    accepted = sum(v.get("ACCEPTED", 0) for v in s.attacks.values())
    attempted = sum(sum(c for k, c in v.items() if k != "interrupted") for v in s.attacks.values())
    checks = {
        "no_attack_accepted": accepted == 0 and not interrupted,
        "no_device_bricked": not end["bricked"],
        "fleet_converged": not not_patched and n > 0 and not interrupted,
    }
    sla_h = o.sla_s / HOUR
    t99 = times["t99_h"]
    return {
        "options": o.to_dict(),
        "keys": sim.keys_backend,
        "stopped": "interrupted (Ctrl-C)" if interrupted else sim.stop_reason,
        "simulated_h": (getattr(sim, "end_t", sim.clock.now()) - t0) / HOUR,
        "wall_s": {k: round(v, 2) for k, v in sim.wall.items()},
        "clock": {  # how far the clock moved on while a poll ran (bounded by the lookahead)
            "lookahead_s": o.lookahead_quanta * o.quantum_s,
            "max_poll_drift_s": s.max_drift_s,
        },
        "fleet": {
            "devices": len(sim.devices),
            "reachable": n,
            "unreachable": len(sim.devices) - n,
            "versions": end["versions"],
            "not_patched_reachable": not_patched[:50],
            "bricked": end["bricked"][:50],
        },
        "time_to_patch_h": times,
        "sla": {
            "window_h": sla_h,
            "t99_within_sla": t99 is not None and t99 <= sla_h,
            "t100_within_sla": times["t100_h"] is not None and times["t100_h"] <= sla_h,
        },
        "key_rotation": (
            {"keylist_target": sim.rel.keylist_target, "time_to_keylist_h": kl_times}
            if o.rotation
            else None
        ),
        "traffic": {
            "checkins": s.checkins,
            "polls_offline": s.offline_polls,
            "bytes_full": s.bytes_full,
            "bytes_delta": s.bytes_delta,
            "image_bytes": len(sim.rel.v_new),
            "patch_bytes": len(sim.rel.patch),
        },
        "faults": {
            "installs_confirmed": s.installs_ok,
            "self_test_reverts": s.reverts,
            "power_cuts": s.power_cuts,
            "link_drops": s.drops,
            "failure_codes": dict(s.failures),
            "device_errors": dict(s.crashes),
        },
        "attacks": {"attempted": attempted, "accepted": accepted, "by_kind": attacks},
        "operator": s.operator,
        "checks": checks,
        "ok": all(checks.values()),
    }


def _fmt_h(v: float | None) -> str:
    return "never" if v is None else f"{v:.1f} h"


def render_text(r: dict[str, Any]) -> str:
    f, t, tr, fa, at = r["fleet"], r["time_to_patch_h"], r["traffic"], r["faults"], r["attacks"]
    lines = [
        f"otaguard fleet simulation ({r['options']['scenario']}): {f['devices']} devices, "
        f"profile {r['options']['profile']}, keys: {r['keys']}",
        f"stopped: {r['stopped']} after {r['simulated_h']:.1f} simulated h "
        f"(wall: {', '.join(f'{k} {v:.1f} s' for k, v in r['wall_s'].items())})",
        f"reachable {f['reachable']} / unreachable {f['unreachable']}; versions {f['versions']}",
        f"time to patch reachable devices: 95% {_fmt_h(t['t95_h'])}, 99% {_fmt_h(t['t99_h'])}, "
        f"100% {_fmt_h(t['t100_h'])} (SLA {r['sla']['window_h']:.0f} h: 99% "
        f"{'met' if r['sla']['t99_within_sla'] else 'MISSED'}, 100% "
        f"{'met' if r['sla']['t100_within_sla'] else 'MISSED'})",
    ]
    if r["key_rotation"]:
        k = r["key_rotation"]["time_to_keylist_h"]
        lines.append(
            f"key list v{r['key_rotation']['keylist_target']}: 95% {_fmt_h(k['t95_h'])}, "
            f"99% {_fmt_h(k['t99_h'])}, 100% {_fmt_h(k['t100_h'])}"
        )
    lines += [
        f"traffic: {tr['checkins']} check-ins, {tr['bytes_delta']:,} B delta + "
        f"{tr['bytes_full']:,} B full (patch {tr['patch_bytes']:,} B vs image "
        f"{tr['image_bytes']:,} B)",
        f"faults: {fa['installs_confirmed']} confirmed installs, {fa['self_test_reverts']} "
        f"self-test reverts, {fa['power_cuts']} power cuts, {fa['link_drops']} link drops; "
        f"codes {fa['failure_codes']}"
        + (f"; device errors {fa['device_errors']}" if fa["device_errors"] else ""),
        f"attacks: {at['attempted']} attempted, {at['accepted']} accepted",
    ]
    for kind, outcomes in sorted(at["by_kind"].items()):
        lines.append(f"  {kind:<13} {outcomes}")
    for line in r["operator"]:
        lines.append(f"  operator: {line}")
    for name, ok in r["checks"].items():
        lines.append(f"check {name}: {'PASS' if ok else 'FAIL'}")
    return "\n".join(lines)


def write_outputs(r: dict[str, Any], timeline: list[dict[str, Any]], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "report.json", json.dumps({**r, "timeline": timeline}, indent=2).encode())
    atomic_write(out / "report.txt", (render_text(r) + "\n").encode())
    return [out / "report.json", out / "report.txt", *plot(r, timeline, out)]


def plot(r: dict[str, Any], timeline: list[dict[str, Any]], out: Path) -> list[Path]:
    if not timeline:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    h = [p["h"] for p in timeline]
    paths = []
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(h, [100 * p["patched"] for p in timeline], label="patched (% of fleet)")
    if r["key_rotation"]:
        ax.plot(h, [100 * p["keylist"] for p in timeline], "--", label="new key list (%)")
    prev = None
    for p in timeline:
        tag = (p["campaign"], p["phase"])
        if tag != prev:
            ax.axvline(p["h"], color="grey", lw=0.6, ls=":")
            ax.text(p["h"], 2, f"c{p['campaign']}p{p['phase']}", fontsize=7, rotation=90)
            prev = tag
    ax.axvline(r["sla"]["window_h"], color="red", lw=1, label="SLA")
    ax.set_xlabel("simulated hours")
    ax.set_ylabel("% of fleet")
    ax.set_ylim(0, 101)
    ax.legend(loc="lower right")
    ax.set_title("Fleet patched over time (campaign c / phase p)")
    paths.append(out / "patched.png")
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(h, [p["failures"] for p in timeline], label="failed attempts (all codes)")
    ax.plot(h, [p["reverts"] for p in timeline], label="self-test reverts")
    ax.set_xlabel("simulated hours")
    ax.set_ylabel("cumulative count")
    ax.legend()
    ax.set_title("Failures and reverts")
    paths.append(out / "failures.png")
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(h, [p["bytes_delta"] / 1e6 for p in timeline], label="delta (patch) MB")
    ax.plot(h, [p["bytes_full"] / 1e6 for p in timeline], label="full image MB")
    n_patched = max(1, r["faults"]["installs_confirmed"])
    ax.axhline(
        n_patched * r["traffic"]["image_bytes"] / 1e6,
        color="grey",
        ls=":",
        label="if every install were a full image",
    )
    ax.set_xlabel("simulated hours")
    ax.set_ylabel("cumulative MB transferred")
    ax.set_yscale("symlog")
    ax.legend()
    ax.set_title("Bytes transferred: delta vs full")
    paths.append(out / "bytes.png")
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)
    return paths
