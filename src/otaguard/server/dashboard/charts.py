"""Server-drawn SVG charts: geometry only, no I/O and no script.

The template turns a :class:`Chart` into inline ``<svg>`` with presentation attributes and
CSS classes from the dashboard's stylesheet, so charts need neither JavaScript nor inline
styles (the Content-Security-Policy allows neither). Labels are escaped by the template.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

W, H = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 48, 12, 12, 28
MAX_POINTS = 400


@dataclass(frozen=True)
class Series:
    name: str
    css: str  # class in dashboard.css (stroke colour)
    points: str  # "x,y x,y ..." for <polyline>


@dataclass(frozen=True)
class Rule:
    pos: float
    label: str
    css: str = "rule"


@dataclass(frozen=True)
class Bar:
    label: str
    value: int
    x: float
    width: float
    css: str


@dataclass
class Chart:
    title: str
    width: int = W
    height: int = H
    series: list[Series] = field(default_factory=list)
    xticks: list[Rule] = field(default_factory=list)
    yticks: list[Rule] = field(default_factory=list)
    hlines: list[Rule] = field(default_factory=list)
    vlines: list[Rule] = field(default_factory=list)
    bars: list[Bar] = field(default_factory=list)
    empty: bool = False

    @property
    def plot(self) -> tuple[int, int, int, int]:
        return LEFT, TOP, W - RIGHT, H - BOTTOM


def _time_label(t: float, span: float) -> str:
    d = dt.datetime.fromtimestamp(t, dt.UTC)
    return d.strftime("%H:%M" if span <= 86400 else "%m-%d %H:%M")


def _thin(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    if len(points) <= MAX_POINTS:
        return list(points)
    step = len(points) / MAX_POINTS
    out = [points[int(i * step)] for i in range(MAX_POINTS)]
    return [*out, points[-1]]


def line_chart(
    title: str,
    series: Sequence[tuple[str, str, Sequence[tuple[float, float]]]],
    *,
    y_max: float,
    y_label: str = "",
    hlines: Sequence[tuple[float, str]] = (),
    vlines: Sequence[tuple[float, str]] = (),
    t_min: float | None = None,
    t_max: float | None = None,
    percent: bool = False,
) -> Chart:
    """Step lines of (time, value) per series on a shared time axis from 0 to ``y_max``.

    ``hlines`` mark levels (thresholds, quotas), ``vlines`` moments (phase changes, pauses).
    """
    chart = Chart(title)
    times = [t for _, _, pts in series for t, _ in pts] + [t for t, _ in vlines]
    if not times or y_max <= 0:
        chart.empty = True
        return chart
    lo = min(times) if t_min is None else t_min
    hi = max(times) if t_max is None else t_max
    if hi <= lo:
        hi = lo + 60
    x0, y0, x1, y1 = chart.plot

    def x(t: float) -> float:
        return round(x0 + (min(max(t, lo), hi) - lo) / (hi - lo) * (x1 - x0), 1)

    def y(v: float) -> float:
        return round(y1 - min(max(v, 0.0), y_max) / y_max * (y1 - y0), 1)

    for name, css, pts in series:
        if not pts:
            continue
        coords: list[str] = []
        prev: float | None = None
        for t, v in _thin(sorted(pts)):
            if prev is not None:
                coords.append(f"{x(t)},{y(prev)}")  # step: hold the last value until now
            coords.append(f"{x(t)},{y(v)}")
            prev = v
        if prev is not None:
            coords.append(f"{x(hi)},{y(prev)}")
        chart.series.append(Series(name, css, " ".join(coords)))
    for i in range(5):
        t = lo + (hi - lo) * i / 4
        chart.xticks.append(Rule(x(t), _time_label(t, hi - lo)))
        v = y_max * i / 4
        label = f"{v / y_max:.0%}" if percent else f"{v:.3g}"
        chart.yticks.append(Rule(y(v), label))
    chart.hlines = [Rule(y(v), label, "level") for v, label in hlines]
    chart.vlines = [Rule(x(t), label, "moment") for t, label in vlines if lo <= t <= hi]
    if y_label:
        chart.title = f"{title} ({y_label})"
    return chart


def bar_chart(title: str, values: Sequence[tuple[str, int, str]]) -> Chart:
    """One horizontal stacked bar of counts (e.g. devices per key-list version)."""
    chart = Chart(title, height=64)
    total = sum(v for _, v, _ in values)
    if total <= 0:
        chart.empty = True
        return chart
    x0, x1 = LEFT, W - RIGHT
    pos = float(x0)
    for label, v, css in values:
        w = round(v / total * (x1 - x0), 1)
        chart.bars.append(Bar(label, v, round(pos, 1), w, css))
        pos += w
    return chart


def campaign_chart(
    st: dict[str, Any], finishes: list[tuple[int, str]], policy: dict[str, Any], now: float
) -> Chart:
    """Devices finished over time (succeeded; failed or reverted), with the phase quota, the
    failure limit and the campaign's events."""
    ok: list[tuple[float, float]] = []
    bad: list[tuple[float, float]] = []
    n_ok = n_bad = 0
    start = st.get("started_at")
    if start is not None:
        ok.append((float(start), 0.0))
        bad.append((float(start), 0.0))
    for t, state in finishes:
        if state == "succeeded":
            n_ok += 1
            ok.append((t, n_ok))
        else:
            n_bad += 1
            bad.append((t, n_bad))
    hlines: list[tuple[float, str]] = [(float(st["quota"]), f"phase {st['phase']} quota")]
    if policy.get("failure_limit") is not None:
        hlines.append((float(policy["failure_limit"]), "failure limit"))
    moments = [
        (float(h["at"]), str(h["event"]))
        for h in st["history"]
        if h["event"] in ("started", "advanced", "paused", "resumed", "completed", "aborted")
    ]
    end = st.get("ended_at") or max([now, *(t for t, _ in ok + bad)])
    return line_chart(
        "devices finished",
        [("succeeded", "ok", ok), ("failed or reverted", "bad", bad)],
        y_max=max(1, int(st["target_size"])),
        hlines=hlines,
        vlines=moments,
        t_max=float(end),
    )


def rotation_chart(view: dict[str, Any], samples: list[tuple[int, dict[int, int]]]) -> Chart:
    """Fraction of the targeted fleet on each key-list version over time (the rotation's
    events plus the samples the dashboard took), with the threshold."""
    start_v = int(view["start_keylist_version"])
    on_new = [(float(e["at"]), float(e["fraction"])) for e in view["history"]]
    versions = sorted({v for _, spread in samples for v in spread})
    per_version: dict[int, list[tuple[float, float]]] = {v: [] for v in versions}
    for t, spread in samples:
        total = sum(spread.values()) or 1
        on_new.append((float(t), sum(n for v, n in spread.items() if v >= start_v) / total))
        for v in versions:
            per_version[v].append((float(t), spread.get(v, 0) / total))
    series = [(f"on v{v}", version_css(v, view), pts) for v, pts in per_version.items()]
    series.append((f"on v{start_v} or later", "ok", sorted(on_new)))  # drawn last: on top
    return line_chart(
        "fraction of the targeted fleet",
        series,
        y_max=1.0,
        percent=True,
        hlines=[(float(view["threshold"]), "threshold")],
        vlines=[(float(e["at"]), str(e["action"])) for e in view["history"]],
    )


def version_css(v: int, view: dict[str, Any]) -> str:
    """Old list, the rotation's start list (or later), its final list."""
    final = view.get("final_keylist_version")
    if final is not None and v >= int(final):
        return "v-final"
    if v >= int(view["start_keylist_version"]):
        return "v-new"
    return "v-old"
