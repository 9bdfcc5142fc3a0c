"""The report for people: one self-contained HTML file, built only from the JSON report.

No network, no script: inline CSS and an inline SVG plot. Every string that comes from
the run (messages, paths, variable names) is escaped, so the file can be rebuilt at any
time from the JSON with ``gradguard report run.json --html report.html``.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from typing import Any

from gradguard.report import write_text_atomic

MiB = float(1 << 20)

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#1d2330;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}
h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #dde1e8;padding-bottom:.2em}
.muted{color:#667085}table{border-collapse:collapse;width:100%;margin:.5em 0}
th,td{text-align:left;vertical-align:top;padding:.35em .6em;border-bottom:1px solid #e6e8ee}
th{background:#f5f6f8;font-weight:600}code{font:12.5px ui-monospace,SFMono-Regular,Menlo,monospace}
.sev{display:inline-block;padding:0 .45em;border-radius:3px;color:#fff;font-size:12px}
.sev-error{background:#c0362c}.sev-warning{background:#c77800}.sev-info{background:#4a6fa5}
.ok{color:#217a3c}svg text{font:11px system-ui,sans-serif;fill:#475467}
"""


def render_html(report: dict[str, Any]) -> str:
    """The HTML page for a JSON report dict (as :meth:`Guard.to_dict` returns it).

    >>> page = render_html({"summary": {"steps": 3}, "findings": [], "environment": {"torch": "2.x"}})
    >>> page.startswith("<!DOCTYPE html>") and "No findings" in page
    True
    """
    summary = report.get("summary") or {}
    findings = report.get("findings") or []
    memory = (report.get("detectors") or {}).get("GG301")
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>gradguard report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>gradguard report</h1>",
        f'<p class="muted">{_e(_headline(report, summary))}</p>',
    ]
    if isinstance(memory, dict) and memory.get("series", {}).get("step"):
        parts.append("<h2>Memory per step</h2>")
        parts.append(memory_plot(memory))
    parts.append("<h2>Findings</h2>")
    parts.append(_findings_table(findings))
    if isinstance(memory, dict):
        groups = (memory.get("census") or {}).get("groups") or []
        if groups:
            parts.append("<h2>Growing tensor groups</h2>")
            parts.append(_groups_table(memory))
        sites = memory.get("allocation_sites") or []
        if sites:
            parts.append("<h2>CUDA allocation sites still alive</h2>")
            parts.append(_sites_table(sites))
    parts.append("<h2>Environment</h2>")
    parts.append(_environment(report, memory if isinstance(memory, dict) else None))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_html(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write :func:`render_html` to ``path`` atomically."""
    write_text_atomic(render_html(report), path)


# --------------------------------------------------------------------------- pieces
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _mib(n: Any) -> str:
    try:
        return f"{float(n) / MiB:,.1f} MiB"
    except (TypeError, ValueError):
        return "?"


def _times(count: Any) -> str:
    return "once" if count == 1 else f"{count} times"


def _headline(report: dict[str, Any], summary: dict[str, Any]) -> str:
    n = len(report.get("findings") or [])
    bits = [
        f"{n} finding{'s' if n != 1 else ''}",
        f"{summary.get('steps', 0)} steps",
        f"{summary.get('iterations', 0)} iterations",
    ]
    if report.get("created"):
        bits.append(f"created {report['created']}")
    if report.get("gradguard"):
        bits.append(f"gradguard {report['gradguard']}")
    return " · ".join(bits)


def _location(loc: Any) -> str:
    if isinstance(loc, dict) and loc.get("file"):
        return f"{loc['file']}:{loc.get('line', '?')}"
    return ""


def _findings_table(findings: Sequence[dict[str, Any]]) -> str:
    if not findings:
        return '<p class="ok">No findings.</p>'
    rows = [
        "<table><thead><tr><th>Code</th><th>Severity</th><th>Location</th><th>Where</th>"
        "<th>What happened</th><th>Hint</th><th>Seen</th></tr></thead><tbody>"
    ]
    for f in findings:
        severity = str(f.get("severity", "warning"))
        css = severity if severity in ("error", "warning", "info") else "info"
        rows.append(
            "<tr>"
            f"<td><code>{_e(f.get('code', ''))}</code><br><span class=muted>{_e(f.get('name', ''))}</span></td>"
            f'<td><span class="sev sev-{css}">{_e(severity)}</span></td>'
            f"<td><code>{_e(_location(f.get('location')))}</code></td>"
            f"<td><code>{_e(f.get('where', ''))}</code></td>"
            f"<td>{_e(f.get('message', ''))}</td>"
            f"<td>{_e(f.get('hint', ''))}</td>"
            f"<td>{_e(_times(f.get('count', 1)))}, from step {_e(f.get('step', 0))}</td>"
            "</tr>"
        )
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _groups_table(memory: dict[str, Any]) -> str:
    census = memory.get("census") or {}
    steps = census.get("steps") or []
    rows = []
    if len(steps) == 2:
        rows.append(f'<p class="muted">Live tensors counted at steps {_e(steps[0])} and {_e(steps[1])}.</p>')
    rows.append("<table><thead><tr><th>Tensor group</th><th>Per step</th><th>Kept alive by</th></tr></thead><tbody>")
    for g in census.get("groups") or []:
        shape = ", ".join(str(s) for s in g.get("shape") or [])
        flags = []
        if g.get("requires_grad"):
            flags.append("requires_grad")
        if g.get("grad_fn"):
            flags.append("grad_fn")
        label = f"[{shape}] {g.get('dtype', '')} on {g.get('device', '')}"
        if flags:
            label += f" ({', '.join(flags)})"
        count = float(g.get("per_step_count", 0))
        per_step = f"+{count:.2g} tensor{'' if count == 1 else 's'}, +{_mib(g.get('per_step_bytes', 0))}"
        if g.get("kind") == "entries":  # a container that gained entries: numpy arrays, Python objects
            label = g.get("entry") or "entries"
            per_step = f"+{count:.2g} entr{'y' if count == 1 else 'ies'}, +{_mib(g.get('per_step_bytes', 0))}"
        if g.get("graph_bytes"):
            per_step += f" (with {_mib(g['graph_bytes'])} of autograd graph each)"
        owners = g.get("owners") or []
        if owners:
            owner_html = "<br>".join(
                f"<code>{_e(o.get('name', ''))}</code> ({_e(o.get('kind', ''))}"
                + (f", <code>{_e(_location(o.get('location')))}</code>" if o.get("location") else "")
                + (f", maxlen {_e(o['maxlen'])}" if o.get("maxlen") is not None else "")
                + f"): {_e(o.get('length', '?'))} items"
                for o in owners
            )
        else:
            owner_html = '<span class="muted">no variable found (held outside Python, or by a temporary)</span>'
        rows.append(f"<tr><td><code>{_e(label)}</code></td><td>{_e(per_step)}</td><td>{owner_html}</td></tr>")
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _sites_table(sites: Sequence[dict[str, Any]]) -> str:
    rows = ["<table><thead><tr><th>Allocated at</th><th>Blocks</th><th>Bytes</th></tr></thead><tbody>"]
    for s in sites:
        where = f"{s.get('file', '?')}:{s.get('line', '?')} in {s.get('function', '?')}"
        cells = (
            f"<td><code>{_e(where)}</code></td><td>{_e(s.get('count', 0))}</td><td>{_e(_mib(s.get('bytes', 0)))}</td>"
        )
        rows.append(f"<tr>{cells}</tr>")
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _environment(report: dict[str, Any], memory: dict[str, Any] | None) -> str:
    env = report.get("environment") or {}
    summary = report.get("summary") or {}
    items: list[tuple[str, Any]] = [
        ("torch", env.get("torch", "?")),
        ("device", env.get("device", "?")),
        ("python", env.get("python", "?")),
        ("platform", env.get("platform", "?")),
    ]
    if memory is not None:
        peak = memory.get("peak") or {}
        if "heap" in peak:
            items.append(("peak host memory in use (malloc)", _mib(peak["heap"])))
        if "rss" in peak:
            items.append(("peak host memory (RSS)", _mib(peak["rss"])))
        if "cuda_peak" in peak:
            items.append(("peak CUDA memory allocated", _mib(peak["cuda_peak"])))
        if "cuda_reserved" in peak:
            items.append(("peak CUDA memory reserved", _mib(peak["cuda_reserved"])))
    if "overhead_s" in summary:
        items.append(("gradguard time", f"{summary.get('overhead_s', 0):.3f} s of {summary.get('wall_s', 0):.3f} s"))
    rows = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in items)
    return f"<table>{rows}</table>"


# --------------------------------------------------------------------------- the plot
_COLOURS = ("#2f6fdb", "#7a8699", "#12a594")


def _el(tag: str, text: str = "", **attrs: Any) -> str:
    """An SVG element; attribute names use ``_`` for ``-``; numbers are rounded."""
    parts = []
    for key, value in attrs.items():
        shown = f"{value:.1f}" if isinstance(value, float) else str(value)
        parts.append(f'{key.rstrip("_").replace("_", "-")}="{_e(shown)}"')
    inner = " ".join(parts)
    return f"<{tag} {inner}>{text}</{tag}>" if text else f"<{tag} {inner}/>"


def memory_plot(memory: dict[str, Any], width: int = 960, height: int = 320) -> str:
    """An inline SVG line plot of memory per step, with the detected trends drawn over it."""
    series = memory.get("series") or {}
    xs = [float(v) for v in series.get("step") or []]
    trends = memory.get("trends") or []
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
    left, right, top, bottom = 70, 20, 30, 42
    pw, ph = width - left - right, height - top - bottom
    x0, x1 = min(xs), max(xs)
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
    if hi - lo < 1.0:
        hi, lo = hi + 0.5, lo - 0.5
    pad = (hi - lo) * 0.05
    lo, hi = lo - pad, hi + pad

    def px(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + (hi - y) / (hi - lo) * ph

    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="memory per step">'
    ]
    warmup = float(memory.get("warmup") or 0)
    if warmup > x0:
        out.append(_el("rect", x=px(x0), y=top, width=px(min(warmup, x1)) - px(x0), height=ph, fill="#f1f2f5"))
        out.append(_el("text", "warm-up", x=px(x0) + 4, y=top + 14))
    for i in range(6):  # y grid and labels
        value = lo + (hi - lo) * i / 5
        y = py(value)
        out.append(_el("line", x1=left, x2=left + pw, y1=y, y2=y, stroke="#e4e7ec"))
        out.append(_el("text", f"{value:,.0f}", x=left - 6, y=y + 4, text_anchor="end"))
    for i in range(6):  # x ticks
        value = x0 + (x1 - x0) * i / 5
        x = px(value)
        out.append(_el("line", x1=x, x2=x, y1=top + ph, y2=top + ph + 5, stroke="#98a2b3"))
        out.append(_el("text", f"{value:,.0f}", x=x, y=top + ph + 18, text_anchor="middle"))
    out.append(_el("rect", x=left, y=top, width=pw, height=ph, fill="none", stroke="#98a2b3"))
    clock = _e(memory.get("clock") or "step")
    out.append(_el("text", clock, x=left + pw / 2, y=height - 6, text_anchor="middle"))
    mid = top + ph / 2
    out.append(_el("text", "MiB", x=14, y=mid, transform=f"rotate(-90 14 {mid:.1f})", text_anchor="middle"))
    for s_name, colour in zip(signals, _COLOURS, strict=False):
        points = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in columns[s_name])
        out.append(_el("polyline", points=points, fill="none", stroke=colour, stroke_width="1.8"))
    for a, b, slope, icpt in lines:
        ya, yb = py(slope * a + icpt), py(slope * b + icpt)
        out.append(_el("line", x1=px(a), y1=ya, x2=px(b), y2=yb, stroke="#d92d20", stroke_width="2.5"))
        if x1 > b:  # where the trend leads if nothing changes
            ye = py(slope * x1 + icpt)
            dashed = {"stroke": "#d92d20", "stroke_width": "1.5", "stroke_dasharray": "5 4"}
            out.append(_el("line", x1=px(b), y1=yb, x2=px(x1), y2=ye, **dashed))
    # the legend sits in the top margin, in one row, clear of the data
    lx = float(left)
    entries = [(names.get(n, n), c, "2", "") for n, c in zip(signals, _COLOURS, strict=False)]
    if lines:
        entries.append((f"detected trend: {lines[0][2]:+,.2f} MiB per {clock}", "#d92d20", "2.5", ""))
    for label, colour, stroke_width, _ in entries:
        out.append(_el("line", x1=lx, x2=lx + 24, y1=12.0, y2=12.0, stroke=colour, stroke_width=stroke_width))
        out.append(_el("text", _e(label), x=lx + 30, y=16.0))
        lx += 30 + 6.5 * len(label) + 24
    out.append("</svg>")
    return "\n".join(out)
