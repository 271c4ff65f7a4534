"""Drawings for the console as inline SVG, made on the server (no JavaScript, nothing vendored).

- :func:`pipeline_graph`: a pipeline's operators as a layered left-to-right graph, each box
  coloured by its state and with the state written under its name;
- :func:`time_chart`: values over time, as stacked bars or as lines with points;
- :func:`job_series`: from the platform's job rows, the series those charts draw (jobs by state,
  throughput and latency per pipeline, in time buckets).

Every function is pure: the same input gives the same SVG. Every name and label is escaped.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from markupsafe import Markup, escape

__all__ = ["PALETTE", "STATE_COLOURS", "job_series", "pipeline_graph", "time_chart"]

FONT = 'font-family="system-ui, sans-serif"'
INK = "#1b1f24"  # text: 16:1 on white
MUTED = "#4a5360"  # axes and grid labels: 7.9:1 on white

# Series colours, each of contrast >= 3:1 against white (checked by a test).
# No red or green: those say failed and succeeded.
PALETTE = ("#0b57d0", "#b35900", "#6a1b9a", "#00796b", "#ad1457", "#5b6b00", "#1a237e", "#4a5360")

# A state's colour, found in lower case (Clara's operator states are PENDING, RUNNING, COMPLETED,
# FAULTED): (ink for its border, text and series, fill of its box). The ink has contrast >= 4.5:1
# against its fill and >= 3:1 against white.
STATE_COLOURS = {
    "succeeded": ("#0a6b2d", "#e6f4ea"),
    "done": ("#0a6b2d", "#e6f4ea"),
    "completed": ("#0a6b2d", "#e6f4ea"),
    "ok": ("#0a6b2d", "#e6f4ea"),
    "running": ("#0b57d0", "#e8f0fe"),
    "starting": ("#0b57d0", "#e8f0fe"),
    "failed": ("#a4161a", "#fce8e6"),
    "broken": ("#a4161a", "#fce8e6"),
    "faulted": ("#a4161a", "#fce8e6"),
    "degraded": ("#7a4d00", "#fef7e0"),
    "queued": ("#6a1b9a", "#f3e8fd"),
    "pending": ("#4a5360", "#f1f3f4"),
    "waiting": ("#4a5360", "#f1f3f4"),
    "cancelled": ("#7a4d00", "#fef7e0"),
    "idle": ("#4a5360", "#f1f3f4"),
    "stopped": ("#4a5360", "#f1f3f4"),
}
NO_STATE = (MUTED, "#ffffff")

# Layout of the graph, in SVG user units (px at scale 1).
BOX_W, BOX_H, GAP_X, GAP_Y, PAD = 150, 46, 56, 18, 12
WAY_H = 8  # the room a long edge takes in a layer it skips
NAME_CHARS = 17  # what fits in a box at font-size 13


def _attr(value: Any) -> str:
    """A value for an attribute between double quotes."""
    return str(escape(str(value)))


def _num(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def _short(name: str, limit: int = NAME_CHARS) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"


def _uid(*parts: Any) -> str:
    """An id for the SVG's marker, the same for the same drawing (several SVGs share a page)."""
    return "df" + hashlib.sha1(repr(parts).encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------- pipeline graph


def _layers(names: list[str], edges: list[tuple[str, str]]) -> tuple[dict[str, int], set]:
    """Each operator's layer (the longest path to it from a source) and the edges that close a
    cycle (found by a depth-first walk in file order; left out of the layering)."""
    succ: dict[str, list[str]] = {n: [] for n in names}
    for a, b in edges:
        succ[a].append(b)
    back: set[tuple[str, str]] = set()
    mark: dict[str, int] = {}  # 1 on the walk's path, 2 done
    order: list[str] = []  # reverse topological order of the acyclic rest
    for root in names:
        if root in mark:
            continue
        mark[root] = 1
        stack = [(root, iter(succ[root]))]
        while stack:
            node, children = stack[-1]
            for child in children:
                if mark.get(child) == 1:
                    back.add((node, child))
                elif child not in mark:
                    mark[child] = 1
                    stack.append((child, iter(succ[child])))
                    break
            else:
                mark[node] = 2
                order.append(node)
                stack.pop()
    layer = {n: 0 for n in names}
    for node in reversed(order):
        for child in succ[node]:
            if (node, child) not in back:
                layer[child] = max(layer[child], layer[node] + 1)
    return layer, back


Node = str | tuple[str, str, int]  # an operator, or a waypoint of a long edge in layer k


def _barycentre(
    n: Node, neighbours: dict[Node, list[Node]], pos: dict[Node, int], here: dict[Node, int]
) -> tuple[float, int]:
    near = [pos[m] for m in neighbours[n]]
    return (sum(near) / len(near) if near else here[n], here[n])


def _order(
    names: list[str], layer: dict[str, int], edges: list[tuple[str, str]]
) -> tuple[list[list[Node]], dict[tuple[str, str], list[Node]]]:
    """The operators of each layer, with a waypoint in every layer that an edge skips (so that it
    runs between boxes, not through them), ordered to cross fewer edges: file order, then two
    sweeps down and up placing each at the mean position of its neighbours in the layer before.
    Also each long edge's waypoints."""
    rows: list[list[Node]] = [[] for _ in range(max(layer.values(), default=-1) + 1)]
    for n in names:
        rows[layer[n]].append(n)
    preds: dict[Node, list[Node]] = defaultdict(list)
    succs: dict[Node, list[Node]] = defaultdict(list)
    waypoints: dict[tuple[str, str], list[Node]] = {}
    for a, b in edges:
        if layer[a] >= layer[b]:
            continue  # one closing a cycle: drawn under the boxes
        chain: list[Node] = [(a, b, k) for k in range(layer[a] + 1, layer[b])]
        for w in chain:
            rows[w[2]].append(w)
        waypoints[(a, b)] = chain
        for u, v in itertools.pairwise([a, *chain, b]):
            preds[v].append(u)
            succs[u].append(v)

    def sweep(indices: Iterable[int], neighbours: dict[Node, list[Node]]) -> None:
        for i in indices:
            pos = {n: k for row in rows for k, n in enumerate(row)}
            here = {n: k for k, n in enumerate(rows[i])}
            rows[i].sort(key=lambda n, pos=pos, here=here: _barycentre(n, neighbours, pos, here))

    for _ in range(2):
        sweep(range(1, len(rows)), preds)
        sweep(range(len(rows) - 2, -1, -1), succs)
    return rows, waypoints


def pipeline_graph(
    operators: list[dict], states: dict[str, str] | None = None, title: str = ""
) -> Markup:
    """A pipeline's operators drawn left to right in layers (a layer: the longest path from a
    source), an arrow per input (``after``), each box with the operator's name (shortened with an
    ellipsis; whole in its tooltip) and, given ``states``, its state written under it and its
    colour. An ``after`` naming no operator is left out; a cycle is drawn with its closing edge
    running back under the boxes."""
    states = states or {}
    names: list[str] = []
    for op in operators:
        name = str(op.get("name", ""))
        if name not in names:
            names.append(name)
    known = set(names)
    edges: list[tuple[str, str]] = []
    for op in operators:
        for src in op.get("after") or []:
            edge = (str(src), str(op.get("name", "")))
            if edge[0] in known and edge not in edges:
                edges.append(edge)
    layer, back = _layers(names, edges)
    rows, waypoints = _order(names, layer, edges)

    def tall(n: Node) -> float:
        return WAY_H if isinstance(n, tuple) else BOX_H

    heights = [sum(tall(n) for n in row) + max(len(row) - 1, 0) * GAP_Y for row in rows]
    inner_h = max([BOX_H, *heights])
    loops = 28 if back else 0
    width = 2 * PAD + len(rows) * BOX_W + max(len(rows) - 1, 0) * GAP_X
    height = 2 * PAD + inner_h + loops
    where: dict[Node, tuple[float, float]] = {}  # top left
    for i, row in enumerate(rows):
        y = PAD + (inner_h - heights[i]) / 2
        for n in row:
            where[n] = (PAD + i * (BOX_W + GAP_X), y)
            y += tall(n) + GAP_Y

    counts: dict[str, int] = {}
    for n in names:
        if n in states:
            counts[str(states[n])] = counts.get(str(states[n]), 0) + 1
    summary = f"{title + ': ' if title else ''}pipeline of {len(names)} operators"
    summary += f", {len(edges)} connections"
    if counts:
        summary += "; " + ", ".join(f"{c} {s}" for s, c in counts.items())
    desc = "; ".join(f"{a} to {b}" for a, b in edges) or "no connections"
    arrow = _uid(names, edges, states, title)

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="pipeline-graph" role="img" '
        f'aria-label="{_attr(summary)}" width="{_num(width)}" height="{_num(height)}" '
        f'viewBox="0 0 {_num(width)} {_num(height)}" style="max-width: 100%; height: auto" {FONT}>',
        f"<title>{escape(summary)}</title><desc>{escape(desc)}</desc>",
        f'<defs><marker id="{arrow}" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" '
        f'markerHeight="7" orient="auto-start-reverse"><path d="M0 0L10 5L0 10z" fill="{MUTED}"/>'
        "</marker></defs>",
    ]
    for a, b in edges:
        (ax, ay), (bx, by) = where[a], where[b]
        if (a, b) not in waypoints:  # closing a cycle: under the boxes, bottom to bottom
            x1, x2, y1, y2 = ax + BOX_W / 2 + 8, bx + BOX_W / 2 - 8, ay + BOX_H, by + BOX_H
            low = _num(PAD + inner_h + loops - 6)
            d = f"M{_num(x1)} {_num(y1)}C{_num(x1)} {low} {_num(x2)} {low} {_num(x2)} {_num(y2)}"
        else:  # curves between the columns, straight through a skipped one at its waypoint
            points = [(ax + BOX_W, ay + BOX_H / 2)]
            for w in waypoints[(a, b)]:
                wx, wy = where[w]
                points += [(wx, wy + WAY_H / 2), (wx + BOX_W, wy + WAY_H / 2)]
            points.append((bx - 1, by + BOX_H / 2))
            d = f"M{_num(points[0][0])} {_num(points[0][1])}"
            for j, ((x1, y1), (x2, y2)) in enumerate(itertools.pairwise(points)):
                mid = _num((x1 + x2) / 2)
                if j % 2:
                    d += f"L{_num(x2)} {_num(y2)}"
                else:
                    d += f"C{mid} {_num(y1)} {mid} {_num(y2)} {_num(x2)} {_num(y2)}"
        out.append(
            f'<path class="edge" data-from="{_attr(a)}" data-to="{_attr(b)}" d="{d}" fill="none" '
            f'stroke="{MUTED}" stroke-width="1.5" marker-end="url(#{arrow})"/>'
        )
    for n in names:
        x, y = where[n]
        state = states.get(n)
        ink, fill = NO_STATE if state is None else STATE_COLOURS.get(str(state).lower(), NO_STATE)
        tip = f"{n}: {state}" if state is not None else n
        name_y = y + (19 if state is not None else 28)
        out.append(
            f'<g class="operator" data-operator="{_attr(n)}"'
            + (f' data-state="{_attr(state)}"' if state is not None else "")
            + f"><title>{escape(tip)}</title>"
            f'<rect x="{_num(x)}" y="{_num(y)}" width="{BOX_W}" height="{BOX_H}" rx="6" '
            f'fill="{fill}" stroke="{ink}" stroke-width="{2 if state is not None else 1.5}"/>'
            f'<text class="name" x="{_num(x + BOX_W / 2)}" y="{_num(name_y)}" '
            f'text-anchor="middle" font-size="13" font-weight="600" fill="{INK}">'
            f"{escape(_short(n))}</text>"
        )
        if state is not None:
            out.append(
                f'<text class="state" x="{_num(x + BOX_W / 2)}" y="{_num(y + 36)}" '
                f'text-anchor="middle" font-size="12" fill="{ink}">{escape(_short(str(state)))}'
                "</text>"
            )
        out.append("</g>")
    out.append("</svg>")
    return Markup("".join(out))


# ----------------------------------------------------------------------------- time charts

CHART_W, CHART_H = 640, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 24, 34, 44  # plot margins; the legend goes under the x labels
LEGEND_ROW = 20
LINE_DASH = ("", "6 3", "2 3", "8 3 2 3")  # lines differ by more than their colour
TIME_STEPS = (60, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


def _ticks(top: float, whole: bool) -> list[float]:
    """3 to 5 round values from 0 covering ``top``: steps of 1, 2, 2.5 or 5 times a power of ten
    (whole steps only for counts)."""
    top = top if top > 0 else 1.0
    power = 10 ** math.floor(math.log10(top / 4))
    for base in (1, 2, 2.5, 5, 10, 20):
        step = base * power
        if whole and step != int(step):
            continue
        if math.ceil(top / step - 1e-9) <= 4:
            break
    n = max(math.ceil(top / step - 1e-9), 2)
    return [k * step for k in range(n + 1)]


def _tick_label(value: float) -> str:
    return f"{value:.10g}" if value == int(value) else f"{value:.3g}"


def _time_ticks(start: float, end: float) -> list[float]:
    """Round local times between start and end, at most 7."""
    span = max(end - start, 1.0)
    step = next((s for s in TIME_STEPS if span / s <= 6), TIME_STEPS[-1] * math.ceil(span / 6e5))
    offset = time.localtime(start).tm_gmtoff
    first = math.ceil((start + offset) / step) * step - offset
    return [t for t in (first + k * step for k in range(8)) if t <= end + 1e-6]


def _colour(name: str, index: int) -> str:
    state = STATE_COLOURS.get(name.lower())
    return state[0] if state else PALETTE[index % len(PALETTE)]


def time_chart(
    series: dict[str, list[tuple[float, float]]],
    start: float,
    end: float,
    unit: str,
    title: str,
    kind: str = "bars",
) -> Markup:
    """A chart of ``series`` (name -> [(bucket start, value)]) between ``start`` and ``end``:
    time across (local HH:MM), values up with 3 to 5 round ticks and ``unit``, a legend. ``bars``
    stacks the series in each bucket (a bucket runs to the next one's start); ``lines`` draws a
    line with points per series, a point in the middle of its bucket. A state's series (``failed``,
    ``succeeded``...) takes that state's colour. Points outside the span or not finite are left
    out; no points at all: the chart says so in words."""
    if kind not in ("bars", "lines"):
        raise ValueError(f"time_chart kind {kind!r}: 'bars' or 'lines'")
    if not end > start:
        raise ValueError(f"time_chart {title!r}: from {start} to {end}, an empty span")
    points: dict[str, list[tuple[float, float]]] = {}
    for name, values in series.items():
        kept = sorted(
            (float(t), float(v))
            for t, v in values
            if start <= t < end and math.isfinite(t) and math.isfinite(v)
        )
        if kept:
            points[str(name)] = kept
    names = list(points)
    legend_rows = math.ceil(len(names) / 4) if names else 0
    height = CHART_H + legend_rows * LEGEND_ROW
    plot_w, plot_h = CHART_W - LEFT - RIGHT, CHART_H - TOP - BOTTOM
    span = end - start

    def x_of(t: float) -> float:
        return LEFT + plot_w * (t - start) / span

    summary = f"{title}: " + (", ".join(names) + f" ({unit})" if names else "no jobs in this time")
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="time-chart" role="img" '
        f'aria-label="{_attr(summary)}" width="{CHART_W}" height="{height}" '
        f'viewBox="0 0 {CHART_W} {height}" style="max-width: 100%; height: auto" {FONT}>',
        f"<title>{escape(summary)}</title>",
        f'<text class="chart-title" x="{LEFT}" y="18" font-size="14" font-weight="600" '
        f'fill="{INK}">{escape(title)}</text>',
    ]
    if not names:
        out.append(
            f'<text class="empty" x="{CHART_W / 2}" y="{TOP + plot_h / 2}" text-anchor="middle" '
            f'font-size="14" fill="{MUTED}">no jobs in this time</text></svg>'
        )
        return Markup("".join(out))

    starts = sorted({t for p in points.values() for t, _ in p})
    gaps = [b - a for a, b in itertools.pairwise(starts) if b > a]
    width_t = min(gaps) if gaps else max(end - starts[0], span / 12)
    if kind == "bars":
        totals: dict[float, float] = {}
        for p in points.values():
            for t, v in p:
                totals[t] = totals.get(t, 0.0) + max(v, 0.0)
        top = max(totals.values())
    else:
        top = max(v for p in points.values() for _, v in p)
    whole = all(v == int(v) for p in points.values() for _, v in p)
    ticks = _ticks(top, whole)
    y_max = ticks[-1]

    def y_of(v: float) -> float:
        return TOP + plot_h * (1 - v / y_max)

    base = TOP + plot_h
    out.append(
        f'<text class="unit" x="{LEFT - 8}" y="{TOP - 14}" text-anchor="end" font-size="12" '
        f'fill="{MUTED}">{escape(unit)}</text>'
    )
    for v in ticks:
        y = _num(y_of(v))
        out.append(
            f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{y}" y2="{y}" stroke="#d5dae1"/>'
            f'<text class="y-tick" data-value="{v:.6g}" x="{LEFT - 6}" y="{y}" '
            f'text-anchor="end" dominant-baseline="middle" font-size="12" fill="{MUTED}">'
            f"{_tick_label(v)}</text>"
        )
    for t in _time_ticks(start, end):
        x = _num(x_of(t))
        label = time.strftime("%H:%M" if span < 2 * 86400 else "%d %b %H:%M", time.localtime(t))
        out.append(
            f'<line x1="{x}" x2="{x}" y1="{_num(base)}" y2="{_num(base + 4)}" stroke="{MUTED}"/>'
            f'<text class="x-tick" x="{x}" y="{_num(base + 18)}" text-anchor="middle" '
            f'font-size="12" fill="{MUTED}">{label}</text>'
        )
    out.append(
        f'<line x1="{LEFT}" x2="{LEFT + plot_w}" y1="{_num(base)}" y2="{_num(base)}" '
        f'stroke="{MUTED}"/>'
    )

    def when(t: float) -> str:
        return time.strftime("%H:%M", time.localtime(t))

    if kind == "bars":
        stacked: dict[float, float] = {}
        bar_w = max(plot_w * width_t / span * 0.8, 1.0)
        for i, name in enumerate(names):
            colour = _colour(name, i)
            for t, v in points[name]:
                if v <= 0:
                    continue
                below = stacked.get(t, 0.0)
                stacked[t] = below + v
                x = x_of(t) + plot_w * width_t / span * 0.1
                y = y_of(below + v)
                tip = f"{name}, {when(t)}–{when(t + width_t)}: {_tick_label(v)} {unit}"
                out.append(
                    f'<rect class="bar" data-series="{_attr(name)}" data-value="{v:.6g}" '
                    f'x="{_num(x)}" y="{_num(y)}" width="{_num(bar_w)}" '
                    f'height="{_num(y_of(below) - y)}" fill="{colour}" stroke="#ffffff" '
                    f'stroke-width="0.5"><title>{escape(tip)}</title></rect>'
                )
    else:
        for i, name in enumerate(names):
            colour = _colour(name, i)
            dash = LINE_DASH[i % len(LINE_DASH)]
            xy = [(x_of(t + width_t / 2), y_of(v), t, v) for t, v in points[name]]
            out.append(
                f'<g class="series" data-series="{_attr(name)}"><polyline fill="none" '
                f'stroke="{colour}" stroke-width="2"'
                + (f' stroke-dasharray="{dash}"' if dash else "")
                + f' points="{" ".join(f"{_num(x)},{_num(y)}" for x, y, _, _ in xy)}"/>'
            )
            for x, y, t, v in xy:
                tip = f"{name}, {when(t)}: {_tick_label(round(v, 3))} {unit}"
                out.append(
                    f'<circle class="point" data-value="{v:.6g}" cx="{_num(x)}" cy="{_num(y)}" '
                    f'r="3.5" fill="{colour}"><title>{escape(tip)}</title></circle>'
                )
            out.append("</g>")

    legend_top = base + 34
    for i, name in enumerate(names):
        x = LEFT + (i % 4) * (plot_w / 4)
        y = legend_top + (i // 4) * LEGEND_ROW
        out.append(
            f'<g class="legend" data-series="{_attr(name)}"><rect x="{_num(x)}" y="{_num(y - 10)}" '
            f'width="12" height="12" fill="{_colour(name, i)}"/><text x="{_num(x + 18)}" '
            f'y="{_num(y)}" font-size="12" fill="{INK}">{escape(_short(name, 22))}'
            f"<title>{escape(name)}</title></text></g>"
        )
    out.append("</svg>")
    return Markup("".join(out))


# ----------------------------------------------------------------------------- series from jobs

ENDED = ("succeeded", "failed")  # jobs a pipeline ran to an end (a cancelled one did not)
STATE_ORDER = ("succeeded", "failed", "running", "queued", "pending", "cancelled")


def _percentile(values: list[float], q: float) -> float:
    """The nearest-rank percentile: the smallest value with at least q % of them at or below."""
    ordered = sorted(values)
    return ordered[max(math.ceil(q / 100 * len(ordered)), 1) - 1]


def job_series(jobs: list[dict], start: float, end: float, buckets: int = 12) -> dict:
    """The series the overview's charts draw, from :meth:`Platform.list_jobs` rows, in
    ``buckets`` equal time buckets from ``start`` to ``end`` (a bucket named by its start):

    - ``states``: {state: [(bucket, jobs created in it that are in that state now)]};
    - ``throughput``: {pipeline: [(bucket, jobs that ended in it, succeeded or failed)]};
    - ``latency``: {pipeline: [(bucket, 95th percentile of finished - created, seconds)]} over
      the jobs that ended in the bucket, only buckets with such jobs; ``latency_p50`` the same
      with the median. Percentiles by nearest rank.

    A state or pipeline appears only with at least one job; rows without a time are skipped."""
    if buckets < 1 or not end > start:
        raise ValueError(f"job_series: {buckets} buckets from {start} to {end}")
    width = (end - start) / buckets
    edges = [start + k * width for k in range(buckets)]

    def bucket(t: Any) -> int | None:
        if not isinstance(t, int | float) or not start <= t <= end:
            return None
        return min(int((t - start) / width), buckets - 1)

    states: dict[str, list[int]] = {}
    ended: dict[str, list[int]] = {}
    took: dict[str, dict[int, list[float]]] = {}
    for job in jobs:
        state, pipeline = str(job.get("state")), str(job.get("pipeline"))
        k = bucket(job.get("created"))
        if k is not None:
            states.setdefault(state, [0] * buckets)[k] += 1
        k = bucket(job.get("finished"))
        created = job.get("created")
        if k is not None and state in ENDED and isinstance(created, int | float):
            ended.setdefault(pipeline, [0] * buckets)[k] += 1
            took.setdefault(pipeline, {}).setdefault(k, []).append(
                max(job["finished"] - created, 0.0)
            )

    def rank(state: str) -> tuple[int, str]:
        return (STATE_ORDER.index(state) if state in STATE_ORDER else len(STATE_ORDER), state)

    def per(q: float) -> dict[str, list[tuple[float, float]]]:
        return {
            p: [(edges[k], _percentile(took[p][k], q)) for k in sorted(took[p])]
            for p in sorted(took)
        }

    return {
        "states": {s: list(zip(edges, states[s])) for s in sorted(states, key=rank)},
        "throughput": {p: list(zip(edges, ended[p])) for p in sorted(ended)},
        "latency": per(95),
        "latency_p50": per(50),
    }
