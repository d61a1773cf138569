"""``otaguard simulate`` and ``otaguard demo``: the fleet simulator (docs/simulator.md)."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import click

from ..errors import ErrorCode, OtaError, UsageError
from ..sim.model import DAY, PROFILES, SCENARIOS, SimOptions, parse_phases


def _check_deps() -> None:
    for mod in ("matplotlib", "rich", "uvicorn", "httpx"):
        try:
            __import__(mod)
        except ImportError:
            raise UsageError(
                ErrorCode.USAGE, f"missing dependency {mod!r}: run 'make venv' (pip install -e .)"
            ) from None


def run_simulation(
    opts: SimOptions, out: Path, *, quiet: bool = False, keep_server: Path | None = None
) -> dict[str, Any]:
    """Set up, run and report; Ctrl-C stops the run and still writes the partial report.
    ``keep_server``: keep the server's data there (for ``--serve``) instead of deleting it."""
    from ..sim.report import build_report, render_text, write_outputs
    from ..sim.runner import Simulation

    _check_deps()
    opts.validate()
    tty = sys.stdout.isatty() and not quiet
    echo = (lambda s: None) if quiet else click.echo
    sim = Simulation(opts, out, log=echo)
    sim.keep_server = keep_server
    interrupted = False
    progress_ctx: Any = None
    try:
        if tty:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            progress_ctx = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[info]}"),
                TimeElapsedColumn(),
            )
            progress_ctx.start()
            task = progress_ctx.add_task("setup", total=1.0, info="")

            def prog(done: float, total: float, info: str) -> None:
                desc = "enrolling" if info == "enrolling" else "simulating"
                progress_ctx.update(
                    task,
                    completed=done / total if total else 0,
                    description=desc,
                    info="" if info == "enrolling" else info,
                )

            sim.progress = prog
        try:
            sim.setup()
            sim.run()
        except KeyboardInterrupt:
            interrupted = True
        except BaseException:
            sim.discard_flash()
            raise
    finally:
        if progress_ctx is not None:
            progress_ctx.stop()
    if not sim.devices:
        sim.discard_flash()
        if interrupted:
            raise KeyboardInterrupt
        raise OtaError(ErrorCode.INTERNAL, "simulation did not start")
    end = sim.finish()
    report = build_report(sim, end, interrupted=interrupted)
    paths = write_outputs(report, sim.stats.timeline, out)
    if not quiet:
        click.echo(render_text(report))
        click.echo("outputs: " + ", ".join(str(p) for p in paths))
    return report


def _fail_line(report: dict[str, Any]) -> str | None:
    failed = [k for k, ok in report["checks"].items() if not ok]
    if not failed:
        return None
    why = {
        "no_attack_accepted": f"{report['attacks']['accepted']} attack(s) accepted",
        "no_device_bricked": f"{len(report['fleet']['bricked'])} device(s) bricked",
        "fleet_converged": (
            f"{len(report['fleet']['not_patched_reachable'])} reachable device(s) not on the "
            "new firmware"
        ),
    }
    return "; ".join(f"{k}: {why[k]}" for k in failed)


def _finish(report: dict[str, Any]) -> None:
    line = _fail_line(report)
    if line is not None:
        raise OtaError(ErrorCode.STATE, f"simulation checks failed: {line}")
    click.echo("all checks passed: no attack accepted, no device bricked, fleet converged")


SERVE_HELP = (
    "afterwards, keep the server's data in OUT/server and serve its admin listener with the "
    "web dashboard on 127.0.0.1 (prints the URL and a login token; Ctrl-C stops it)"
)


@click.command()
@click.option("--scenario", type=click.Choice(sorted(SCENARIOS)), default=None)
@click.option("--devices", type=int, default=None, help="fleet size")
@click.option("--profile", type=click.Choice(sorted(PROFILES)), default=None)
@click.option("--phases", default=None, help="percent[:soak], e.g. 5:2h,30:2h,100")
@click.option("--days", type=float, default=None, help="simulated window")
@click.option("--sla-days", type=float, default=None)
@click.option("--powercut-rate", type=float, default=None)
@click.option("--selftest-fail-rate", type=float, default=None)
@click.option("--attack-rate", type=float, default=None)
@click.option("--drop-rate", type=float, default=None)
@click.option("--rotation/--no-rotation", default=None)
@click.option("--image-size", type=int, default=None)
@click.option("--seed", type=int, default=None)
@click.option("--workers", type=int, default=None)
@click.option("--keys", "hsm", type=click.Choice(["auto", "softhsm", "software"]), default=None)
@click.option("--full-window", is_flag=True, help="keep polling after the fleet converged")
@click.option("--out", type=click.Path(path_type=Path), default=Path("sim-out"))
@click.option("--quiet", is_flag=True)
@click.option("--serve", is_flag=True, help=SERVE_HELP)
@click.option("--port", type=int, default=8444, show_default=True, help="port for --serve")
def simulate(out: Path, quiet: bool, full_window: bool, serve: bool, port: int, **kw: Any) -> None:
    """Simulate a fleet update campaign over real HTTPS on simulated time."""
    base = SCENARIOS[kw.pop("scenario") or "demo"]
    opts = options_from(base, full_window=full_window, **kw)
    _run_and_serve(opts, out, serve, port, quiet=quiet)


def _run_and_serve(opts: SimOptions, out: Path, serve: bool, port: int, **kw: Any) -> None:
    if not 0 <= port <= 65535:
        raise UsageError(ErrorCode.USAGE, f"port must be 0-65535, got {port}")
    keep = out / "server" if serve else None
    report = run_simulation(opts, out, keep_server=keep, **kw)
    if keep is not None:
        from ..sim.serve import serve as serve_dashboard

        click.echo(_fail_line(report) or "all checks passed")
        serve_dashboard(keep, "127.0.0.1", port, echo=lambda s: click.echo(s))
    _finish(report)


def options_from(base: SimOptions, *, full_window: bool = False, **kw: Any) -> SimOptions:
    """Apply command-line overrides to a scenario (None = keep the scenario's value)."""
    ch: dict[str, Any] = {}
    prof = base.profile
    if kw.get("profile") is not None:
        prof = PROFILES[kw["profile"]]
    if kw.get("drop_rate") is not None:
        prof = dataclasses.replace(prof, drop_rate=kw["drop_rate"])
    ch["profile"] = prof
    if kw.get("phases") is not None:
        ch["phases"] = parse_phases(kw["phases"])
    if kw.get("days") is not None:
        ch["duration_s"] = kw["days"] * DAY
    if kw.get("sla_days") is not None:
        ch["sla_s"] = kw["sla_days"] * DAY
    for name in (
        "devices",
        "powercut_rate",
        "selftest_fail_rate",
        "attack_rate",
        "rotation",
        "image_size",
        "seed",
        "workers",
        "hsm",
    ):
        if kw.get(name) is not None:
            ch[name] = kw[name]
    if full_window:
        ch["stop_when_converged"] = False
        ch["retire_converged"] = False
    return dataclasses.replace(base, **ch).validate()


@click.command()
@click.option("--out", type=click.Path(path_type=Path), default=Path("demo-out"))
@click.option("--devices", type=int, default=None, help="fleet size (default 1000)")
@click.option("--seed", type=int, default=None)
@click.option("--keys", "hsm", type=click.Choice(["auto", "softhsm", "software"]), default=None)
@click.option("--serve", is_flag=True, help=SERVE_HELP)
@click.option("--port", type=int, default=8444, show_default=True, help="port for --serve")
def demo(
    out: Path, devices: int | None, seed: int | None, hsm: str | None, serve: bool, port: int
) -> None:
    """The whole pipeline on ~1,000 simulated devices (what `make demo` runs)."""
    opts = options_from(SCENARIOS["demo"], devices=devices, seed=seed, hsm=hsm)
    _run_and_serve(opts, out, serve, port)


@click.command("simulate-renewal")
@click.option("--devices", type=int, default=20, show_default=True, help="fleet size")
@click.option("--lifetime-hours", type=float, default=12.0, show_default=True)
@click.option("--lifetimes", type=float, default=2.5, show_default=True, help="run length")
@click.option("--fraction", type=float, default=1 / 3, help="renew below this share left")
@click.option("--poll-interval", type=int, default=1800, show_default=True, help="seconds")
@click.option("--outage-rate", type=float, default=0.3, show_default=True)
@click.option("--crash-rate", type=float, default=0.3, show_default=True)
@click.option("--seed", type=int, default=1, show_default=True)
@click.option("--no-issuer", is_flag=True, help="server without an issuing CA (control run)")
@click.option("--out", type=click.Path(path_type=Path), default=Path("renewal-sim-out"))
@click.option("--json", "as_json", is_flag=True)
def simulate_renewal(
    devices: int,
    lifetime_hours: float,
    lifetimes: float,
    fraction: float,
    poll_interval: int,
    outage_rate: float,
    crash_rate: float,
    seed: int,
    no_issuer: bool,
    out: Path,
    as_json: bool,
) -> None:
    """Certificate renewal over several certificate lifetimes: exit 1 if a device locks out."""
    import json

    from ..sim.renewal import RenewalSimOptions, clean, run_renewal_sim

    opts = RenewalSimOptions(
        devices=devices,
        lifetime=int(lifetime_hours * 3600),
        lifetimes=lifetimes,
        fraction=fraction,
        poll_interval=poll_interval,
        outage_rate=outage_rate,
        crash_rate=crash_rate,
        seed=seed,
        issuer=not no_issuer,
    )
    try:
        report = run_renewal_sim(opts, out / "work").to_dict()
    finally:
        clean(out / "work")  # scratch: the simulated CA, device keys, database
    out.mkdir(parents=True, exist_ok=True)
    (out / "renewal.json").write_text(json.dumps(report, indent=2) + "\n")
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(
            f"{report['devices']} devices, {report['lifetimes']} lifetimes of "
            f"{report['lifetime_s']} s: {report['renewals']} renewals, power cuts "
            f"{report['crashes']}, locked out {len(report['locked_out'])}"
        )
    if not report["ok"]:
        bad = report["locked_out"] + report["final_checkin_failures"]
        raise OtaError(
            ErrorCode.STATE, f"renewal simulation: {len(bad)} device(s) locked out: {bad[:3]}"
        )
