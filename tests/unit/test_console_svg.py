"""The console's drawings (dataflow.platform.console.svg), read back as XML the way a browser
would: what a person relies on in a pipeline's graph (every operator once, with its state in
words, arrows for its inputs, left to right, nothing on top of anything) and in the charts
(bars in proportion, ticks that reach the top, a legend, words when there is nothing)."""

from __future__ import annotations

import itertools
import math
import random
import re
import time
import xml.etree.ElementTree as ET

import pytest

from dataflow.platform.console.svg import (
    PALETTE,
    STATE_COLOURS,
    job_series,
    pipeline_graph,
    time_chart,
)

NS = "{http://www.w3.org/2000/svg}"
HOUR = 3600.0
START = 1_800_000_000.0 - 1_800_000_000.0 % HOUR  # a whole hour (UTC), 2027
END = START + 12 * HOUR

DIAMOND = [
    {"name": "reader", "after": []},
    {"name": "segment", "after": ["reader"]},
    {"name": "stats", "after": ["reader"]},
    {"name": "writer", "after": ["segment", "stats", "reader"]},
    {"name": "export", "after": ["writer"]},
]


def parse(markup) -> ET.Element:
    return ET.fromstring(str(markup))


def boxes(svg: ET.Element) -> dict[str, ET.Element]:
    found: dict[str, ET.Element] = {}
    for g in svg.iter(f"{NS}g"):
        if g.get("class") == "operator":
            assert g.get("data-operator") not in found, "an operator drawn twice"
            found[g.get("data-operator")] = g
    return found


def rect(g: ET.Element) -> tuple[float, float, float, float]:
    r = g.find(f"{NS}rect")
    return tuple(float(r.get(k)) for k in ("x", "y", "width", "height"))


def texts(g: ET.Element, cls: str) -> list[str]:
    return [t.text for t in g.iter(f"{NS}text") if t.get("class") == cls]


def edges(svg: ET.Element) -> list[tuple[str, str]]:
    return [
        (p.get("data-from"), p.get("data-to"))
        for p in svg.iter(f"{NS}path")
        if p.get("class") == "edge"
    ]


# ----------------------------------------------------------------------------- pipeline graph


def test_every_operator_is_one_box_with_its_name_and_state_in_words():
    states = {"reader": "succeeded", "segment": "running", "stats": "failed", "writer": "pending"}
    svg = parse(pipeline_graph(DIAMOND, states, title="ct-seg"))
    drawn = boxes(svg)
    assert list(drawn) == [op["name"] for op in DIAMOND]
    for name, g in drawn.items():
        assert texts(g, "name") == [name]
        assert texts(g, "state") == ([states[name]] if name in states else [])
        assert g.find(f"{NS}title").text == (f"{name}: {states[name]}" if name in states else name)
    # the colour says the state too, never alone: failed and succeeded boxes differ
    fills = {n: g.find(f"{NS}rect").get("fill") for n, g in drawn.items()}
    assert len({fills["reader"], fills["segment"], fills["stats"], fills["writer"]}) == 4
    assert svg.get("role") == "img"
    label = svg.get("aria-label")
    assert "ct-seg" in label and "5 operators" in label and "1 failed" in label
    assert svg.find(f"{NS}title").text == label
    # Clara's operator states, in capitals, take the same colours
    upper = boxes(parse(pipeline_graph(DIAMOND, {"stats": "FAULTED", "reader": "COMPLETED"})))
    assert upper["stats"].find(f"{NS}rect").get("fill") == fills["stats"]
    assert upper["reader"].find(f"{NS}rect").get("fill") == fills["reader"]
    assert texts(upper["stats"], "state") == ["FAULTED"]


def test_an_arrow_per_input_and_sources_left_of_their_targets():
    svg = parse(pipeline_graph(DIAMOND))
    wanted = [(src, op["name"]) for op in DIAMOND for src in op["after"]]
    assert sorted(edges(svg)) == sorted(wanted)
    marker = svg.find(f"{NS}defs/{NS}marker").get("id")
    for p in svg.iter(f"{NS}path"):
        if p.get("class") == "edge":
            assert p.get("marker-end") == f"url(#{marker})"
    drawn = boxes(svg)
    for src, dst in wanted:
        assert rect(drawn[src])[0] + rect(drawn[src])[2] < rect(drawn[dst])[0], (src, dst)


def test_no_two_boxes_overlap_and_all_fit_the_drawing():
    many = [{"name": f"op{i}", "after": [f"op{j}" for j in range(i) if (i * j) % 3 == 1]}
            for i in range(14)]  # fmt: skip
    svg = parse(pipeline_graph(many))
    width, height = float(svg.get("width")), float(svg.get("height"))
    assert svg.get("viewBox") == f"0 0 {svg.get('width')} {svg.get('height')}"
    places = [rect(g) for g in boxes(svg).values()]
    assert len(places) == 14
    for x, y, w, h in places:
        assert x >= 0 and x + w <= width and y >= 0 and y + h <= height
    for (x1, y1, w1, h1), (x2, y2, w2, h2) in itertools.combinations(places, 2):
        assert x1 + w1 <= x2 or x2 + w2 <= x1 or y1 + h1 <= y2 or y2 + h2 <= y1


def path_segments(d: str) -> list[tuple[str, list[tuple[float, float]]]]:
    """An edge's path as (command, points from the pen's place to the segment's end)."""
    out, pen = [], None
    for command, numbers in re.findall(r"([MCL])([^MCL]*)", d):
        values = [float(v) for v in numbers.split()]
        points = list(zip(values[::2], values[1::2], strict=True))
        if command != "M":
            out.append((command, [pen, *points]))
        pen = points[-1]
    return out


@pytest.mark.parametrize("skips", [1, 3])
def test_arrows_run_between_boxes_never_through_one(skips):
    chain = [{"name": f"c{i}", "after": [f"c{i - 1}"] if i else []} for i in range(skips + 2)]
    side = [{"name": f"s{i}", "after": ["c0"] if i == 1 else [f"s{i - 1}"]}
            for i in range(1, skips + 1)]  # fmt: skip
    last = f"c{skips + 1}"
    ops = [*chain, *side, {"name": "end", "after": [last, "c0", f"s{skips}"]}]
    svg = parse(pipeline_graph(ops))
    places = [rect(g) for g in boxes(svg).values()]
    paths = [p.get("d") for p in svg.iter(f"{NS}path") if p.get("class") == "edge"]
    assert len(paths) == sum(len(op["after"]) for op in ops)
    for d in paths:
        for command, points in path_segments(d):
            xs = [x for x, _ in points]
            for bx, by, bw, bh in places:
                if command == "C":  # a curve stays within its points' span: a gap between columns
                    assert max(xs) <= bx + 1 or min(xs) >= bx + bw - 1, d
                else:
                    (x1, y1), (x2, y2) = points
                    assert y1 == y2, d
                    assert not (bx < max(x1, x2) and min(x1, x2) < bx + bw and by < y1 < by + bh), d


def test_operators_within_a_layer_are_ordered_so_that_arrows_do_not_cross():
    # b1 takes a2's output and b2 a1's: drawn in file order, the two arrows would cross
    ops = [
        {"name": "a1", "after": []},
        {"name": "a2", "after": []},
        {"name": "b1", "after": ["a2"]},
        {"name": "b2", "after": ["a1"]},
    ]
    drawn = boxes(parse(pipeline_graph(ops)))
    y = {n: rect(g)[1] for n, g in drawn.items()}
    assert (y["a1"] < y["a2"]) == (y["b2"] < y["b1"])


def test_names_that_look_like_markup_are_escaped():
    nasty = "seg<script>&\"x'"
    ops = [{"name": "in&out", "after": []}, {"name": nasty, "after": ["in&out"]}]
    markup = pipeline_graph(ops, {nasty: 'bad<"state">'}, title="<b>title</b>")
    assert "<script>" not in str(markup) and "<b>" not in str(markup)
    svg = parse(markup)
    drawn = boxes(svg)
    assert set(drawn) == {"in&out", nasty}
    assert texts(drawn[nasty], "name") == [nasty]
    assert texts(drawn[nasty], "state") == ['bad<"state">']
    assert edges(svg) == [("in&out", nasty)]
    assert svg.get("aria-label").startswith("<b>title</b>:")


def test_a_long_name_is_shortened_in_its_box_and_whole_in_its_tooltip():
    name = "a-very-long-operator-name-that-goes-on"
    g = boxes(parse(pipeline_graph([{"name": name, "after": []}], {name: "running"})))[name]
    shown = texts(g, "name")[0]
    assert shown.endswith("…") and name.startswith(shown[:-1]) and len(shown) < len(name)
    assert g.find(f"{NS}title").text == f"{name}: running"


def test_a_cycle_or_an_unknown_input_is_drawn_as_far_as_it_goes():
    ops = [
        {"name": "a", "after": ["c"]},
        {"name": "b", "after": ["a"]},
        {"name": "c", "after": ["b"]},
        {"name": "d", "after": ["ghost", "a"]},
        {"name": "e", "after": ["e"]},
        {"name": "f"},
    ]
    svg = parse(pipeline_graph(ops, {"zz": "running"}))
    assert set(boxes(svg)) == {"a", "b", "c", "d", "e", "f"}
    assert sorted(edges(svg)) == sorted([("c", "a"), ("a", "b"), ("b", "c"), ("a", "d"),
                                         ("e", "e")])  # fmt: skip
    assert "0 connections" not in svg.get("aria-label")
    assert parse(pipeline_graph([])).get("aria-label") == "pipeline of 0 operators, 0 connections"


# ----------------------------------------------------------------------------- charts


def chart_parts(svg: ET.Element, cls: str, tag: str = "rect") -> list[ET.Element]:
    return [e for e in svg.iter(f"{NS}{tag}") if e.get("class") == cls]


def test_stacked_bars_are_in_proportion_and_the_ticks_reach_the_top():
    series = {
        "succeeded": [(START, 3), (START + HOUR, 6), (START + 2 * HOUR, 0)],
        "failed": [(START, 1), (START + HOUR, 2), (START + 2 * HOUR, 5)],
    }
    svg = parse(time_chart(series, START, END, "jobs", "Jobs by state"))
    bars = chart_parts(svg, "bar")
    assert len(bars) == 5  # no bar for a zero
    per_unit = {float(b.get("height")) / float(b.get("data-value")) for b in bars}
    assert max(per_unit) - min(per_unit) < 0.1
    by = {(b.get("data-series"), float(b.get("x"))): b for b in bars}
    for (name, x), b in by.items():  # failed sits on succeeded in the same bucket
        if name == "failed" and ("succeeded", x) in by:
            under = by[("succeeded", x)]
            assert float(b.get("y")) + float(b.get("height")) == pytest.approx(
                float(under.get("y")), abs=0.11
            )
    ticks = [float(t.get("data-value")) for t in chart_parts(svg, "y-tick", "text")]
    buckets = {t for p in series.values() for t, _ in p}
    top = max(sum(v for p in series.values() for t, v in p if t == x) for x in buckets)
    assert 3 <= len(ticks) <= 5 and ticks[0] == 0 and ticks[-1] >= top
    assert ticks[-2] < top  # no tick wasted above the tallest bar
    steps = {round(b - a, 9) for a, b in itertools.pairwise(ticks)}
    assert len(steps) == 1
    assert chart_parts(svg, "unit", "text")[0].text == "jobs"
    legend = [g.get("data-series") for g in chart_parts(svg, "legend", "g")]
    assert legend == ["succeeded", "failed"]
    assert STATE_COLOURS["failed"][0] in {
        b.get("fill") for b in bars if b.get("data-series") == "failed"
    }


@pytest.mark.parametrize("top", [0.37, 1, 7, 48, 950, 12345.6])
def test_ticks_are_round_and_cover_the_largest_value(top):
    series = {"p": [(START, top / 3), (START + HOUR, top)]}
    svg = parse(time_chart(series, START, END, "s", "Latency", kind="lines"))
    ticks = [float(t.get("data-value")) for t in chart_parts(svg, "y-tick", "text")]
    assert 3 <= len(ticks) <= 5 and ticks[0] == 0 and ticks[-1] >= top
    step = ticks[1]
    mantissa = step / 10 ** math.floor(math.log10(step))
    assert round(mantissa, 6) in (1, 2, 2.5, 5)
    labels = [t.text for t in chart_parts(svg, "y-tick", "text")]
    assert all(float(label) == pytest.approx(v) for label, v in zip(labels, ticks, strict=True))


def test_time_labels_are_local_round_times_within_the_chart():
    svg = parse(time_chart({"a": [(START, 1)]}, START, END, "jobs", "t"))
    labels = [t.text for t in chart_parts(svg, "x-tick", "text")]
    assert 4 <= len(labels) <= 7
    first = time.localtime(START)
    for label in labels:
        assert re.fullmatch(r"\d\d:\d\d", label)
    shown = [int(label[:2]) * 60 + int(label[3:]) for label in labels]
    assert all((b - a) % (24 * 60) == (shown[1] - shown[0]) for a, b in itertools.pairwise(shown))
    assert (shown[0] - (first.tm_hour * 60 + first.tm_min)) % (24 * 60) < 12 * 60


def test_lines_draw_a_point_per_value_and_one_colour_per_series():
    series = {"ct": [(START, 2.0), (START + 3 * HOUR, 4.5)], "mr": [(START + HOUR, 9.0)]}
    svg = parse(time_chart(series, START, END, "s", "Latency p95", kind="lines"))
    groups = chart_parts(svg, "series", "g")
    assert [g.get("data-series") for g in groups] == ["ct", "mr"]
    colours = set()
    for g, name in zip(groups, series, strict=True):
        points = [p for p in g.iter(f"{NS}circle")]
        assert [float(p.get("data-value")) for p in points] == [v for _, v in series[name]]
        line = g.find(f"{NS}polyline")
        assert len(line.get("points").split()) == len(series[name])
        colours.add(line.get("stroke"))
    assert len(colours) == 2
    ys = {float(p.get("data-value")): float(p.get("cy")) for p in svg.iter(f"{NS}circle")}
    assert ys[9.0] < ys[4.5] < ys[2.0]  # higher values higher up


@pytest.mark.parametrize(
    "series",
    [
        {},
        {"ct": []},
        {"ct": [], "mr": []},
        {"ct": [(START - HOUR, 3), (END, 1), (START, math.nan)]},
    ],
)
def test_a_chart_with_nothing_to_draw_says_so(series):
    svg = parse(time_chart(series, START, END, "jobs", "Throughput"))
    assert [t.text for t in chart_parts(svg, "empty", "text")] == ["no jobs in this time"]
    assert chart_parts(svg, "bar") == []
    assert "no jobs in this time" in svg.get("aria-label")


def test_chart_names_are_escaped_and_a_wrong_kind_is_refused():
    markup = time_chart({'<img src=x>&"': [(START, 1)]}, START, END, "<u>", "<b>x</b>")
    assert "<img" not in str(markup) and "<b>" not in str(markup)
    svg = parse(markup)
    assert chart_parts(svg, "legend", "g")[0].get("data-series") == '<img src=x>&"'
    with pytest.raises(ValueError, match="'pie'"):
        time_chart({}, START, END, "s", "x", kind="pie")
    with pytest.raises(ValueError, match="empty span"):
        time_chart({}, END, START, "s", "x")


def luminance(colour: str) -> float:
    rgb = [int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in rgb]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def contrast(a: str, b: str) -> float:
    hi, lo = sorted((luminance(a), luminance(b)), reverse=True)
    return (hi + 0.05) / (lo + 0.05)


def test_colours_stand_out_against_white_and_state_words_against_their_box():
    for colour in PALETTE:
        assert contrast(colour, "#ffffff") >= 3, colour
    assert len(set(PALETTE)) == len(PALETTE)
    for state, (ink, fill) in STATE_COLOURS.items():
        assert contrast(ink, "#ffffff") >= 3, state
        assert contrast(ink, fill) >= 4.5, state


# ----------------------------------------------------------------------------- series from jobs


def nearest_rank(values: list[float], q: float) -> float:
    """The smallest value with at least q % of the values at or below it."""
    return min(v for v in values if sum(x <= v for x in values) >= q / 100 * len(values))


def some_jobs(seed: int = 7) -> list[dict]:
    rng = random.Random(seed)
    jobs = []
    for i in range(120):
        created = START - HOUR + rng.random() * 14 * HOUR  # some before, some after the span
        state = rng.choice(["succeeded", "succeeded", "failed", "running", "queued", "cancelled"])
        ended = state in ("succeeded", "failed", "cancelled")
        jobs.append({
            "id": f"{i:032x}", "pipeline": rng.choice(["ct-seg", "mr-brain"]), "state": state,
            "created": created, "started": created + 1 if state != "queued" else None,
            "finished": created + rng.random() * 900 if ended else None,
        })  # fmt: skip
    jobs.append({"pipeline": "ct-seg", "state": "failed", "created": None, "finished": None})
    return jobs


def test_job_series_counts_and_percentiles_per_bucket():
    jobs = some_jobs()
    got = job_series(jobs, START, END, buckets=12)
    starts = [START + k * HOUR for k in range(12)]

    def inside(t, k):
        return t is not None and starts[k] <= t < starts[k] + HOUR

    for state in {j["state"] for j in jobs}:
        counts = [sum(j["state"] == state and inside(j["created"], k) for j in jobs)
                  for k in range(12)]  # fmt: skip
        if any(counts):
            assert got["states"][state] == list(zip(starts, counts, strict=True))
        else:
            assert state not in got["states"]
    assert list(got["states"])[:2] == ["succeeded", "failed"]
    for pipeline in ("ct-seg", "mr-brain"):
        ended = [
            j for j in jobs if j["pipeline"] == pipeline and j["state"] in ("succeeded", "failed")
        ]
        counts = [sum(inside(j["finished"], k) for j in ended) for k in range(12)]
        assert got["throughput"][pipeline] == list(zip(starts, counts, strict=True))
        latency = []
        for k in range(12):
            took = [j["finished"] - j["created"] for j in ended if inside(j["finished"], k)]
            if took:
                latency.append((starts[k], took))
        assert got["latency"][pipeline] == [(t, nearest_rank(v, 95)) for t, v in latency]
        assert got["latency_p50"][pipeline] == [(t, nearest_rank(v, 50)) for t, v in latency]
    # cancelled jobs ended but are not throughput
    assert sum(n for p in got["throughput"].values() for _, n in p) < sum(
        inside(j["finished"], k) for j in jobs for k in range(12)
    )
    shuffled = jobs[:]
    random.Random(1).shuffle(shuffled)
    assert job_series(shuffled, START, END, buckets=12) == got


def test_job_series_edges_and_bad_arguments():
    jobs = [
        {"pipeline": "p", "state": "succeeded", "created": START, "finished": END},
        {"pipeline": "p", "state": "succeeded", "created": START - 1, "finished": END + 1},
    ]
    got = job_series(jobs, START, END, buckets=4)
    assert got["states"] == {"succeeded": [(START + k * 3 * HOUR, int(k == 0)) for k in range(4)]}
    assert got["throughput"]["p"][-1] == (START + 9 * HOUR, 1)  # the end belongs to the last
    assert got["latency"]["p"] == [(START + 9 * HOUR, END - START)]
    assert job_series([], START, END) == {"states": {}, "throughput": {}, "latency": {},
                                          "latency_p50": {}}  # fmt: skip
    with pytest.raises(ValueError, match="0 buckets"):
        job_series([], START, END, buckets=0)
    with pytest.raises(ValueError):
        job_series([], END, START)


def test_job_series_draws_as_charts():
    got = job_series(some_jobs(), START, END)
    bars = parse(time_chart(got["states"], START, END, "jobs", "Jobs by state"))
    drawn = sum(float(b.get("data-value")) for b in chart_parts(bars, "bar"))
    assert drawn == sum(n for p in got["states"].values() for _, n in p)
    lines = parse(time_chart(got["latency"], START, END, "s", "Latency p95", kind="lines"))
    assert len(list(lines.iter(f"{NS}circle"))) == sum(len(p) for p in got["latency"].values())
