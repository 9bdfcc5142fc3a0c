"""The report for people: one self-contained HTML file, built only from the JSON report.

No network, no script: inline CSS and an inline SVG plot (:mod:`gradguard.report_plot`).
Every string that comes from the run (messages, paths, variable names, the command line)
is escaped, so the file can be rebuilt at any time from the JSON with
``gradguard report run.json --html report.html``. Evidence is shown as of the end of the
run where the report has it (the detectors' end-of-run data, each finding's last
version), labelled apart from what was measured when the finding was first made.
"""

from __future__ import annotations

import html
import os
import re
import shlex
from collections.abc import Sequence
from typing import Any

from gradguard import ranks
from gradguard.report import write_text_atomic
from gradguard.report_plot import Marker, MiB, format_duration, growth_evidence, memory_plot, seconds_per_step

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;
color:#1d2330;padding:0 1em}
h1{font-size:1.5em;margin-bottom:.2em}
h2{font-size:1.15em;margin-top:1.8em;border-bottom:1px solid #dde1e8;padding-bottom:.2em}
.muted{color:#667085}table{border-collapse:collapse;width:100%;margin:.5em 0}
th,td{text-align:left;vertical-align:top;padding:.35em .6em;border-bottom:1px solid #e6e8ee}
th{background:#f5f6f8;font-weight:600}code{font:12.5px ui-monospace,SFMono-Regular,Menlo,monospace}
td{overflow-wrap:break-word}.cmd{background:#f5f6f8;padding:.4em .6em;border-radius:4px;overflow-wrap:anywhere}
.sev{display:inline-block;padding:0 .45em;border-radius:3px;color:#fff;font-size:12px}
.sev-error{background:#c0362c}.sev-warning{background:#c77800}.sev-info{background:#4a6fa5}
.ok{color:#217a3c}.evidence{margin:.4em 0 0;padding-left:1.1em}.evidence li{margin:.15em 0}
.plot{overflow-x:auto}.plot svg{width:100%;min-width:600px;height:auto}
svg text{font:11px system-ui,sans-serif;fill:#475467}svg .marker text{font-weight:600}
.legend{list-style:none;padding:0;margin:.3em 0;display:flex;flex-wrap:wrap;gap:.2em 1.4em;font-size:13px}
.swatch{display:inline-block;width:22px;margin-right:.4em;vertical-align:middle}.nowrap{white-space:nowrap}
tr:target{background:#fff6d6}.marker:target .marker-line{stroke-width:3}
@media (max-width:700px){.findings thead{position:absolute;left:-9999px}
.findings tr,.findings td{display:block}td{overflow-wrap:anywhere}.findings td{border:0;padding:.15em 0}
.findings tr{border-bottom:1px solid #dde1e8;padding:.5em 0}
.findings td:empty{display:none}.findings td[data-label]::before{content:attr(data-label) ": ";font-weight:600}
svg text{font-size:17px}}
"""
_CODE_SPAN = re.compile(r"``(.+?)``|`([^`\n]+)`")
_STRONG = re.compile(r"\*\*(?=\S)(.+?)(?<=\S)\*\*")
_COLOURS = {"error": "#c0362c", "warning": "#c77800", "info": "#4a6fa5"}
_RANK = {"info": 0, "warning": 1, "error": 2}
_ENVIRONMENT = ("torch", "device", "python", "platform")


def render_html(report: dict[str, Any]) -> str:
    """The HTML page for a JSON report dict (as :meth:`Guard.to_dict` returns it).

    >>> page = render_html({"summary": {"steps": 3}, "findings": [], "environment": {"torch": "2.x"}})
    >>> page.startswith("<!DOCTYPE html>") and "No findings" in page
    True
    """
    summary = report.get("summary") or {}
    findings = [f for f in report.get("findings") or [] if isinstance(f, dict)]
    memory = (report.get("detectors") or {}).get("GG301")
    memory = memory if isinstance(memory, dict) else None
    xs = [x for x in ((memory or {}).get("series") or {}).get("step") or [] if isinstance(x, (int, float))]
    marked = memory is not None and memory.get("clock", "step") == "step"  # findings count steps, not iterations
    markers = _markers(findings, xs[0] - 1, max(xs[-1], summary.get("steps") or 0)) if marked and xs else []
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        "<title>gradguard report</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>gradguard report</h1>",
        f'<p class="muted">{_e(_headline(report, summary))}</p>',
    ]
    command = _command_line(report.get("command"))
    if command:
        parts.append(f'<p class="cmd">Command: <code>{_e(command)}</code></p>')
    if memory is not None and xs:
        parts.append("<h2>Memory per step</h2>")
        parts.append(f'<div class="plot">{memory_plot(memory, markers)}</div>')
    parts.append("<h2>Findings</h2>")
    parts.append(_findings_table(findings, memory, summary, {m.anchor for m in markers}))
    static = report.get("static")
    if isinstance(static, list):  # gradguard run --lint: what the source shows, beside what the run saw
        parts.append("<h2>In the source (gradguard lint)</h2>")
        parts.append(_findings_table([f for f in static if isinstance(f, dict)], None, {}, set()))
    if memory is not None:
        groups = (memory.get("census") or {}).get("groups") or []
        if groups:
            parts.append("<h2>Growing tensor groups</h2>")
            parts.append(_groups_table(memory))
        sites = memory.get("allocation_sites") or []
        if sites:
            parts.append("<h2>CUDA allocation sites still alive</h2>")
            parts.append(_sites_table(sites))
    parts.append("<h2>Environment</h2>")
    parts.append(_environment(report, memory))
    parts.append("</body></html>\n")
    return "\n".join(parts)


def write_html(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write :func:`render_html` to ``path`` atomically."""
    write_text_atomic(render_html(report), path)


def inline_html(text: Any) -> str:
    """A message or hint as escaped HTML: backtick spans become ``<code>``, ``**`` emphasis is dropped.

    >>> inline_html("`cache` grows **fast**: ``a**2`` & <b>")
    '<code>cache</code> grows fast: <code>a**2</code> &amp; &lt;b&gt;'
    """
    return "".join(f"<code>{_e(piece)}</code>" if code else _e(piece) for code, piece in _spans(str(text)))


def plain_text(text: Any) -> str:
    """A message or hint as plain text, without backticks or ``**`` (for tooltips).

    >>> plain_text("`cache` grows **fast**")
    'cache grows fast'
    """
    return "".join(piece for _, piece in _spans(str(text)))


def _spans(text: str) -> list[tuple[bool, str]]:
    """``(is_code, text)`` pieces; emphasis is stripped outside code spans only (``x**2`` stays)."""
    codes = [m.group(1) or m.group(2) for m in _CODE_SPAN.finditer(text)]
    prose = _STRONG.sub(r"\1", _CODE_SPAN.sub("\0", text.replace("\0", ""))).split("\0")
    pieces = [(False, prose[0])]
    for code, after in zip(codes, prose[1:], strict=True):
        pieces += [(True, code), (False, after)]
    return [p for p in pieces if p[1]]


# --------------------------------------------------------------------------- pieces
def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _mib(n: Any) -> str:
    try:
        return f"{float(n) / MiB:,.1f} MiB"
    except (TypeError, ValueError):
        return "?"


def _headline(report: dict[str, Any], summary: dict[str, Any]) -> str:
    n = len(report.get("findings") or [])
    bits = [
        f"{n} finding{'s' if n != 1 else ''}",
        f"{summary.get('steps', 0)} steps",
        f"{summary.get('iterations', 0)} iterations",
    ]
    if isinstance(summary.get("wall_s"), (int, float)) and summary["wall_s"] > 0:
        bits.append(f"{format_duration(summary['wall_s'])} of wall time")
    if report.get("created"):
        bits.append(f"created {report['created']}")
    if report.get("gradguard"):
        bits.append(f"gradguard {report['gradguard']}")
    return " · ".join(bits)


def _command_line(command: Any) -> str:
    """The recorded command line, shell-quoted, or ``""`` when the report has none.

    >>> _command_line({"argv": ["train.py", "--name", "my run"], "script": "/abs/train.py"})
    "train.py --name 'my run'"
    """
    if not isinstance(command, dict) or not isinstance(command.get("argv"), list) or not command["argv"]:
        return ""
    return shlex.join(str(a) for a in command["argv"])


def _path(text: Any) -> str:
    """A path, escaped, that may break after each separator on a narrow window."""
    return _e(text).replace("/", "/<wbr>").replace("\\", "\\<wbr>")


def _location(loc: Any) -> str:
    if isinstance(loc, dict) and loc.get("file"):
        return f"{loc['file']}:{loc.get('line', '?')}"
    return ""


def _markers(findings: Sequence[dict[str, Any]], first: float, last: float) -> list[Marker]:
    """One marker per step in ``[first, last]`` at which findings were made, in the colour of the worst,
    linked to the first of them (a finding restored from before a resumed run's series has none)."""
    by_step: dict[int, list[int]] = {}
    for i, f in enumerate(findings):
        step = f.get("step")
        if isinstance(step, int) and not isinstance(step, bool) and first <= step <= last:
            by_step.setdefault(step, []).append(i)
    markers = []
    for step, rows in by_step.items():
        found = [findings[i] for i in rows]
        codes = list(dict.fromkeys(str(f.get("code", "")) for f in found))
        label = " ".join(codes[:2]) + (f" +{len(codes) - 2}" if len(codes) > 2 else "")
        lines = [
            f"{f.get('code', '')} {f.get('name', '')}, {_seen(f)}: {plain_text(f.get('message', ''))}" for f in found
        ]
        worst = max(_RANK.get(str(f.get("severity")), 0) for f in found)
        colour = _COLOURS[list(_RANK)[worst]]
        markers.append(Marker(step, label, "\n".join(lines), f"marker-step-{step}", f"#finding-{rows[0]}", colour))
    return markers


def _seen(f: dict[str, Any]) -> str:
    sides = f.get("seen_by") or []
    if sides[:1] == ["static"]:  # a static finding
        return "also while the program ran" if "runtime" in sides else "in the source only"
    count = f.get("count", 1)
    seen = f"once, at step {f.get('step', 0)}" if count == 1 else f"{count} times, from step {f.get('step', 0)}"
    return seen + ("; the source shows it too" if "static" in sides else "")


def _findings_table(
    findings: Sequence[dict[str, Any]], memory: dict[str, Any] | None, summary: dict[str, Any], anchors: set[str]
) -> str:
    if not findings:
        return '<p class="ok">No findings.</p>'
    world = summary.get("world_size")
    by_rank = isinstance(world, int) and world > 1  # a run of several ranks: which saw each finding
    rows = [
        '<table class="findings"><thead><tr><th scope="col">Finding</th><th scope="col">Where</th>'
        '<th scope="col">What happened</th><th scope="col">Hint</th><th scope="col">Seen</th>'
        + ('<th scope="col">Ranks</th>' if by_rank else "")
        + "</tr></thead><tbody>"
    ]
    for i, f in enumerate(findings):
        severity = str(f.get("severity", "warning"))
        css = severity if severity in _COLOURS else "info"
        seen = _e(_seen(f))
        anchor = f"marker-step-{f.get('step')}"
        if anchor in anchors:
            seen += f' <a href="#{anchor}" title="its marker on the memory plot">(marked on the plot)</a>'
        evidence = "".join(
            f"<li><strong>{_e(k)}:</strong> {_e(v)}</li>" for k, v in growth_evidence(f, memory, summary)
        )
        where = [_path(_location(f.get("location"))), _e(f.get("where") or "")]
        rows.append(
            f'<tr id="finding-{i}"><td><code>{_e(f.get("code", ""))}</code> '
            f'<span class="sev sev-{css}">{_e(severity)}</span><br>'
            f'<span class="muted nowrap">{_e(f.get("name", ""))}</span></td>'
            f'<td data-label="Where">{"<br>".join(f"<code>{w}</code>" for w in where if w)}</td>'
            f'<td data-label="What happened">{inline_html(f.get("message", ""))}'
            + (f'<ul class="evidence">{evidence}</ul>' if evidence else "")
            + f'</td><td data-label="Hint">{inline_html(f.get("hint", ""))}</td>'
            f'<td data-label="Seen">{seen}</td>'
            + (
                f'<td data-label="Ranks">{_e(ranks.describe(ranks.finding_ranks(f), noun=False))}</td>'
                if by_rank
                else ""
            )
            + "</tr>"
        )
    rows.append("</tbody></table>")
    return "\n".join(rows)


# --------------------------------------------------------------------------- GG301's census, the environment
def _groups_table(memory: dict[str, Any]) -> str:
    census = memory.get("census") or {}
    steps = census.get("steps") or []
    rows = []
    if len(steps) == 2:
        rows.append(
            f'<p class="muted">Live tensors counted at steps {_e(steps[0])} and {_e(steps[1])}, '
            f"when the growth was found (step {_e(steps[1])}), not at the end of the run.</p>"
        )
    rows.append(
        '<table><thead><tr><th scope="col">Tensor group</th><th scope="col">Per step</th>'
        '<th scope="col">Kept alive by</th></tr></thead><tbody>'
    )
    counted = f" at step {steps[-1]}" if steps else ""
    for g in census.get("groups") or []:
        shape = ", ".join(str(s) for s in g.get("shape") or [])
        flags = [flag for flag in ("requires_grad", "grad_fn") if g.get(flag)]
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
                + (f", <code>{_path(_location(o.get('location')))}</code>" if o.get("location") else "")
                + (f", maxlen {_e(o['maxlen'])}" if o.get("maxlen") is not None else "")
                + f"): {_e(o.get('length', '?'))} items{_e(counted)}"
                for o in owners
            )
        else:
            owner_html = '<span class="muted">no variable found (held outside Python, or by a temporary)</span>'
        rows.append(f"<tr><td><code>{_e(label)}</code></td><td>{_e(per_step)}</td><td>{owner_html}</td></tr>")
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _sites_table(sites: Sequence[dict[str, Any]]) -> str:
    rows = [
        '<table><thead><tr><th scope="col">Allocated at</th><th scope="col">Blocks</th>'
        '<th scope="col">Bytes</th></tr></thead><tbody>'
    ]
    for s in sites:
        where = f"{s.get('file', '?')}:{s.get('line', '?')} in {s.get('function', '?')}"
        count, size = _e(s.get("count", 0)), _e(_mib(s.get("bytes", 0)))
        rows.append(f"<tr><td><code>{_path(where)}</code></td><td>{count}</td><td>{size}</td></tr>")
    rows.append("</tbody></table>")
    return "\n".join(rows)


def _environment(report: dict[str, Any], memory: dict[str, Any] | None) -> str:
    env = report.get("environment") or {}
    summary = report.get("summary") or {}
    raw = report.get("command")
    command: dict[str, Any] = raw if isinstance(raw, dict) else {}
    items: list[tuple[str, Any]] = [("command line", _command_line(command))] if _command_line(command) else []
    for key, name in (("script", "script"), ("module", "module"), ("cwd", "working directory"), ("python", "python")):
        if command.get(key):
            items.append((name, command[key]))
    items += [(f"{k} version" if k in ("torch", "python") else k, env.get(k, "?")) for k in _ENVIRONMENT]
    if memory is not None:
        peak = memory.get("peak") or {}
        for key, name in (
            ("heap", "peak host memory in use (malloc)"),
            ("rss", "peak host memory (RSS)"),
            ("cuda_peak", "peak CUDA memory allocated"),
            ("cuda_reserved", "peak CUDA memory reserved"),
        ):
            if key in peak:
                items.append((name, _mib(peak[key])))
    unit = str((memory or {}).get("clock") or "step")
    per = seconds_per_step(memory, summary, unit)
    if per is not None:
        items.append((f"time per {unit}", f"{per[0]:.3g} s ({per[1]})"))
    if "overhead_s" in summary:
        items.append(("gradguard time", f"{summary.get('overhead_s', 0):.3f} s of {summary.get('wall_s', 0):.3f} s"))
    rows = "".join(f'<tr><th scope="row">{_e(k)}</th><td>{_path(v)}</td></tr>' for k, v in items)
    return f"<table>{rows}</table>"
