"""The memory of a run in the HTML report: the plot of memory per step, and what a growth means in time.

:func:`memory_plot` draws one inline SVG: axes ticked at nice numbers (:func:`nice_ticks`),
the detected trends over the series, and each finding as a vertical :class:`Marker` at
its step, labelled with its code, with a tooltip (``<title>``) and a link to its row of
the findings table. :func:`growth_evidence` reads a GG301 finding's figures as they were
when it was found and, from the series, as they stand at the end of the run, with the
time left until memory runs out. Every string is escaped here; callers pass plain text.
"""

from __future__ import annotations

import dataclasses
import html
import math
from collections.abc import Sequence
from typing import Any

from gradguard.errors import ConfigurationError
from gradguard.memory.trend import theil_sen

MiB = float(1 << 20)
_MULTIPLES = (1.0, 2.0, 2.5, 5.0, 10.0)
_COLOURS = ("#2f6fdb", "#7a8699", "#12a594")
_TREND = "#d92d20"
_DASHED = {"stroke_dasharray": "4 3", "class_": "marker-line"}


def nice_step(span: float, count: int = 5) -> float:
    """The spacing of ticks over ``span`` in at most ``count`` intervals: 1, 2, 2.5 or 5 times a power of ten.

    >>> nice_step(79), nice_step(325), nice_step(0.9), nice_step(1, count=4), nice_step(48_000)
    (20.0, 100.0, 0.2, 0.25, 10000.0)
    """
    if not isinstance(span, (int, float)) or isinstance(span, bool) or not math.isfinite(span) or span <= 0:
        raise ConfigurationError(f"Expected span to be a positive finite number but got {span!r}")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ConfigurationError(f"Expected count to be an int >= 1 but got {count!r}")
    raw = span / count
    power = 10.0 ** math.floor(math.log10(raw))
    return next(m * power for m in _MULTIPLES if m * power >= raw * (1 - 1e-9))


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Ticks at the multiples of :func:`nice_step` that lie in ``[lo, hi]``.

    >>> nice_ticks(95, 420)
    [100.0, 200.0, 300.0, 400.0]
    >>> nice_ticks(1, 80)
    [20.0, 40.0, 60.0, 80.0]
    >>> nice_ticks(0, 1, count=4)
    [0.0, 0.25, 0.5, 0.75, 1.0]
    >>> nice_ticks(3, 3)
    [3.0]
    """
    for name, value in (("lo", lo), ("hi", hi)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise ConfigurationError(f"Expected {name} to be a finite number but got {value!r}")
    if hi < lo:
        raise ConfigurationError(f"Expected hi to be >= lo ({lo!r}) but got {hi!r}")
    if hi == lo:
        return [float(lo)]
    step = nice_step(hi - lo, count)
    first, last = math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9)
    return [float(f"{k * step:.12g}") + 0.0 for k in range(first, last + 1)]


def tick_label(value: float, step: float) -> str:
    """A tick's text: as many decimals as the step needs, thousands separated.

    >>> tick_label(12500, 2500), tick_label(0.75, 0.25), tick_label(1.5, 0.5)
    ('12,500', '0.75', '1.5')
    """
    decimals = 0
    while decimals < 9 and abs(round(step, decimals) - step) > 1e-9 * abs(step):
        decimals += 1
    return f"{value:,.{decimals}f}"


@dataclasses.dataclass(frozen=True)
class Marker:
    """A finding drawn on the plot: a vertical line at ``step`` labelled ``label``.

    ``title`` is the tooltip (plain text), ``anchor`` the marker's element id, ``href``
    where the marker links to (a row of the findings table), ``colour`` its stroke.

    >>> Marker(40, "GG301", "GG301 at step 40", "marker-step-40", "#finding-0").label
    'GG301'
    """

    step: float
    label: str
    title: str
    anchor: str
    href: str = ""
    colour: str = "#c0362c"


def _mib(n: Any) -> str:
    try:
        return f"{float(n) / MiB:,.1f} MiB"
    except (TypeError, ValueError):
        return "?"


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _el(tag: str, text: str = "", **attrs: Any) -> str:
    """An SVG element with escaped text; attribute names use ``_`` for ``-``; floats are rounded."""
    parts = []
    for key, value in attrs.items():
        shown = f"{value:.1f}" if isinstance(value, float) else str(value)
        parts.append(f'{key.rstrip("_").replace("_", "-")}="{_e(shown)}"')
    inner = " ".join(parts)
    return f"<{tag} {inner}>{_e(text)}</{tag}>" if text else f"<{tag} {inner}/>"


def memory_plot(memory: dict[str, Any], markers: Sequence[Marker] = (), *, width: int = 960, height: int = 340) -> str:
    """The plot of memory per step (an HTML legend and an inline SVG): the trends over it, a marker per finding."""
    series = memory.get("series") or {}
    xs = [float(v) for v in series.get("step") or []]
    trends = [t for t in memory.get("trends") or [] if isinstance(t, dict)]
    signals = [
        s
        for s in ("cuda_allocated", "heap", "rss")
        if len(series.get(s) or []) == len(xs) and sum(v is not None for v in series[s]) >= 2
    ]
    if trends and trends[0].get("signal") in signals:
        signals.remove(trends[0]["signal"])
        signals.insert(0, trends[0]["signal"])
    if not xs or not signals:
        return '<p class="muted">No memory samples.</p>'
    signal = signals[0]
    columns = {s: [(x, float(v) / MiB) for x, v in zip(xs, series[s], strict=True) if v is not None] for s in signals}
    ys = [y for column in columns.values() for _, y in column]
    names = memory.get("signals") or {}
    left, right, top, bottom = 74, 24, 50, 44
    pw, ph = width - left - right, height - top - bottom
    x0, x1 = min([*xs, *(m.step for m in markers)]), max([*xs, *(m.step for m in markers)])
    if x1 == x0:
        x1 = x0 + 1
    lines = [
        (float(t["start"]), float(t["end"]), float(t["slope"]) / MiB, float(t["intercept"]) / MiB)
        for t in trends
        if t.get("signal") == signal
    ]
    lo, hi = min(ys), max(ys)
    for a, _, slope, icpt in lines:
        lo = min(lo, slope * a + icpt)
        hi = max(hi, slope * x1 + icpt)
    if hi - lo < 1.0:  # a flat series: a MiB of range, not its noise blown up
        hi, lo = (hi + lo) / 2 + 0.5, (hi + lo) / 2 - 0.5
    y_step = nice_step(hi - lo)
    lo, hi = math.floor(lo / y_step + 1e-9) * y_step, math.ceil(hi / y_step - 1e-9) * y_step

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + (hi - y) / (hi - lo) * ph

    clock = str(memory.get("clock") or "step")
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-labelledby="plot-title"><title id="plot-title">Memory per {_e(clock)}</title>'
    ]
    warmup = float(memory.get("warmup") or 0)
    if warmup > x0:
        out.append(_el("rect", x=px(x0), y=top, width=px(min(warmup, x1)) - px(x0), height=ph, fill="#f1f2f5"))
        out.append(_el("text", "warm-up", x=px(x0) + 4, y=top + 16))
    for value in nice_ticks(lo, hi):
        y = py(value)
        out.append(_el("line", x1=left, x2=left + pw, y1=y, y2=y, stroke="#e4e7ec"))
        out.append(_el("text", tick_label(value, y_step), x=left - 6, y=y + 4, text_anchor="end"))
    x_step = nice_step(x1 - x0)
    for value in nice_ticks(x0, x1):
        x = px(value)
        out.append(_el("line", x1=x, x2=x, y1=top + ph, y2=top + ph + 5, stroke="#98a2b3"))
        out.append(_el("text", tick_label(value, x_step), x=x, y=top + ph + 18, text_anchor="middle"))
    out.append(_el("rect", x=left, y=top, width=pw, height=ph, fill="none", stroke="#98a2b3"))
    out.append(_el("text", clock, x=left + pw / 2, y=height - 6, text_anchor="middle"))
    mid = top + ph / 2
    out.append(_el("text", "MiB", x=16, y=mid, transform=f"rotate(-90 16 {mid:.1f})", text_anchor="middle"))
    for s_name, colour in zip(signals, _COLOURS, strict=False):
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in columns[s_name])
        out.append(_el("polyline", points=points, fill="none", stroke=colour, stroke_width="1.8"))
    for a, b, slope, icpt in lines:
        ya, yb = py(slope * a + icpt), py(slope * b + icpt)
        out.append(
            _el("line", x1=px(a), y1=ya, x2=px(b), y2=yb, stroke=_TREND, stroke_width="2.5", stroke_opacity="0.8")
        )
        if x1 > b:  # where the trend leads if nothing changes
            ye = py(slope * x1 + icpt)
            dashed = {"stroke": _TREND, "stroke_width": "1.5", "stroke_dasharray": "5 4"}
            out.append(_el("line", x1=px(b), y1=yb, x2=px(x1), y2=ye, **dashed))
    out.extend(_markers(markers, px, top, ph, left + pw))
    out.append("</svg>")
    # the legend is HTML above the plot: it wraps on a narrow window, and reads as text
    entries = [(str(names.get(n, n)), c, "solid") for n, c in zip(signals, _COLOURS, strict=False)]
    if lines:
        entries.append((f"detected trend: {lines[0][2]:+,.2f} MiB per {clock}", _TREND, "solid"))
    if markers:
        entries.append((f"a finding, at the {clock} it was found (dashed)", "#c77800", "dashed"))
    legend = "".join(
        f'<li><span class="swatch" style="border-top:3px {style} {colour}"></span>{_e(label)}</li>'
        for label, colour, style in entries
    )
    out.insert(0, f'<ul class="legend">{legend}</ul>')
    return "\n".join(out)


def _markers(markers: Sequence[Marker], px: Any, top: float, ph: float, right: float) -> list[str]:
    """The markers' lines across the plot, their labels above it on two rows where they would overlap."""
    out: list[str] = []
    row_end = [-math.inf, -math.inf]  # where the last label of each row ends
    for marker in sorted(markers, key=lambda m: m.step):
        x = px(float(marker.step))
        width = 10.0 * len(marker.label)  # room for the larger text of a narrow window
        flip = x + 3 + width > right  # near the right edge: the label reads leftwards
        start = x - 3 - width if flip else x + 3
        row = 0 if start > row_end[0] + 4 else 1
        row_end[row] = start + width
        y = top - 6 - 18 * row
        anchor = {"text_anchor": "end"} if flip else {}
        body = (
            f"<title>{_e(marker.title)}</title>"
            + _el("line", x1=x, x2=x, y1=y + 3, y2=top + ph, stroke=marker.colour, stroke_width="1.5", **_DASHED)
            + _el("text", marker.label, x=x - 3 if flip else x + 3, y=y, style=f"fill:{marker.colour}", **anchor)
        )
        group = f'<g id="{_e(marker.anchor)}" class="marker">{body}</g>'
        out.append(f'<a href="{_e(marker.href)}">{group}</a>' if marker.href else group)
    return out


# --------------------------------------------------------------------------- the figures of a growth
def _about(n: float) -> str:
    """A count for an estimate: three significant digits (``12,400``)."""
    n = max(0, round(n))
    return f"{round(n, 2 - len(str(n)) + 1) if n >= 1000 else n:,}"


def format_duration(seconds: float) -> str:
    """A duration for people, in its two largest units.

    >>> format_duration(12000), format_duration(389), format_duration(42.4), format_duration(3 * 86400 + 7300)
    ('3 h 20 min', '6 min 29 s', '42 s', '3 d 2 h')
    """
    s = round(seconds)
    if s < 1:
        return "under 1 s"
    d, h, m = s // 86400, s % 86400 // 3600, s % 3600 // 60
    units = [(d, "d"), (h, "h"), (m, "min"), (s % 60, "s")]
    first = next(i for i, (v, _) in enumerate(units) if v)
    return " ".join(f"{v} {u}" for v, u in units[first : first + 2] if v)


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def seconds_per_step(memory: dict[str, Any] | None, summary: dict[str, Any], unit: str) -> tuple[float, str] | None:
    """Seconds per step (or iteration), and where the figure comes from: the samples' times if the
    series has them, else the run's wall time over its steps."""
    series = (memory or {}).get("series") or {}
    xs, times = series.get("step") or [], series.get("time_s") or []
    if len(times) == len(xs):
        warmup = _num((memory or {}).get("warmup")) or 0
        timed = [(float(x), t) for x, t in zip(xs, times, strict=True) if _num(t) is not None]
        timed = [p for p in timed if p[0] > warmup] or timed
        if len(timed) >= 2 and timed[-1][0] > timed[0][0]:
            (xa, ta), (xb, tb) = timed[0], timed[-1]
            return (tb - ta) / (xb - xa), f"measured over {unit}s {xa:.0f}-{xb:.0f}"
    wall, count = _num(summary.get("wall_s")), _num(summary.get(f"{unit}s"))
    if wall and count and wall > 0 and count > 0:
        return wall / count, f"the run's wall time over its {count:,.0f} {unit}s"
    return None


def out_of_memory(steps: float, per: tuple[float, str] | None, unit: str) -> str:
    """How long until memory runs out, in steps and, given seconds per step, in wall time.

    >>> out_of_memory(12_437, (0.97, "the run's wall time over its 80 steps"), "step")
    'out of memory in ~12,400 steps (~3 h 21 min at 0.97 s/step)'
    """
    text = f"out of memory in ~{_about(steps)} {unit}s"
    if per is not None and per[0] > 0:
        rate = f"{per[0]:,.0f}" if per[0] >= 10 else f"{per[0]:.2g}"
        text += f" (~{format_duration(steps * per[0])} at {rate} s/{unit})"
    return text


def growth_evidence(f: dict[str, Any], memory: dict[str, Any] | None, summary: dict[str, Any]) -> list[tuple[str, str]]:
    """A memory growth's figures when it was found, and as of the end of the run (from the series)."""
    raw = f.get("data")
    data: dict[str, Any] = raw if isinstance(raw, dict) else {}
    rate = _num(data.get("rate_mib_per_step"))
    if f.get("code") != "GG301" or rate is None:
        return []
    unit = str(data.get("clock") or (memory or {}).get("clock") or "step")
    found = _num(f.get("step")) or 0.0
    per = seconds_per_step(memory, summary, unit)
    when = f"{rate:,.2f} MiB per {unit}"
    window, growth = data.get("window") or [], _num(data.get("growth_mib"))
    if len(window) == 2 and growth is not None:
        when += f", +{growth:,.0f} MiB over {unit}s {window[0]:.0f}-{window[1]:.0f}"
    oom = _num(data.get("projected_oom_step"))
    if oom is not None:
        when += "; " + out_of_memory(oom - found, per, unit)
    out = [(f"When found at {unit} {found:.0f}", when)]
    series = (memory or {}).get("series") or {}
    xs, values = series.get("step") or [], series.get(str(data.get("signal"))) or []
    points = [(float(x), float(v)) for x, v in zip(xs, values, strict=False) if _num(v) is not None]
    after = [p for p in points if p[0] > found][-64:]
    if len(after) < 8:  # too little since to speak of the end of the run
        return out
    end = max(after[-1][0], _num(summary.get(f"{unit}s")) or 0.0)
    slope = theil_sen([p[0] for p in after], [p[1] for p in after])[0] / MiB
    label = ((memory or {}).get("signals") or {}).get(data.get("signal"), data.get("signal"))
    now = f"{label} at {_mib(after[-1][1])}"
    before = [v for x, v in points if x <= found]
    if before:
        now += f" (+{_mib(after[-1][1] - before[-1])} since {unit} {found:.0f})"
    now += f"; {slope:,.2f} MiB per {unit} over {unit}s {after[0][0]:.0f}-{after[-1][0]:.0f}"
    free = _num(data.get("memory_free"))
    if "stopped" in data or slope < 0.1 * rate:
        now += "; no longer growing, so no out of memory in sight"
    elif free is not None and before:
        left = free - (after[-1][1] - before[-1])
        if left <= 0:
            now += "; the memory free when it was found is used up"
        else:
            now += "; " + out_of_memory(after[-1][0] + left / (slope * MiB) - end, per, unit)
    out.append((f"As of {unit} {end:.0f}, end of run", now))
    return out
