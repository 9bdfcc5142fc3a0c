"""The HTML report: one self-contained page, every string escaped, rebuilt from the JSON alone."""

import html
import itertools
import json
import math
import re
import shlex

import pytest
import torch
from torch import nn

import gradguard
from gradguard.detectors import MemoryGrowth
from gradguard.errors import ConfigurationError
from gradguard.report_html import render_html
from gradguard.report_plot import nice_step, nice_ticks

EVIL = '<script>alert("x")</script>'


def _report(**extra):
    steps = list(range(1, 41))
    series = {"step": steps, "rss": [300 * 2**20 + 2 * 2**20 * s for s in steps]}
    finding = {
        "code": "GG301",
        "name": "memory-growth",
        "severity": "warning",
        "message": f"`{EVIL}` (dict, train.py:31) gains 1 tensor [1024, 512] float32 (2 MiB) per step",
        "hint": "Stop keeping a tensor & clear it",
        "location": {"file": f"runs/{EVIL}/train.py", "line": 31, "function": "main"},
        "where": EVIL,
        "step": 40,
        "count": 1,
        "data": {},
    }
    group = {
        "shape": [1024, 512],
        "dtype": "float32",
        "device": "cpu",
        "requires_grad": False,
        "grad_fn": False,
        "per_step_count": 1.0,
        "per_step_bytes": 2 * 2**20,
        "graph_bytes": 0,
        "owners": [{"name": EVIL, "kind": "dict", "location": finding["location"], "held": 8, "length": 40}],
    }
    memory = {
        "clock": "step",
        "warmup": 10,
        "signals": {"rss": "host memory (RSS)"},
        "series": series,
        "trends": [{"signal": "rss", "slope": 2 * 2**20, "intercept": 300 * 2**20, "start": 11, "end": 34}],
        "census": {"steps": [28, 34], "groups": [group]},
        "allocation_sites": [],
        "peak": {"rss": max(series["rss"])},
    }
    report = {
        "version": 1,
        "created": "2025-01-01T00:00:00+00:00",
        "summary": {"steps": 40, "iterations": 40, "overhead_s": 0.1, "wall_s": 2.0},
        "environment": {"torch": "2.13.0", "device": "cpu", "python": "3.11", "platform": EVIL},
        "findings": [finding],
        "detectors": {"GG301": memory},
    }
    report.update(extra)
    return report


def test_page_is_self_contained_and_has_every_section():
    page = render_html(_report())
    assert page.startswith("<!DOCTYPE html>")
    assert page.rstrip().endswith("</html>")
    for heading in ("Memory per step", "Findings", "Growing tensor groups", "Environment"):
        assert f"<h2>{heading}</h2>" in page
    assert "<svg" in page
    assert page.count("<polyline") == 1  # the memory series
    assert 'stroke="#d92d20"' in page  # the trend line over it
    assert "detected trend: +2.00 MiB per step" in page
    assert "2.13.0" in page  # torch version
    assert "peak host memory (RSS)" in page
    # no script and nothing fetched from elsewhere
    assert "<script" not in page.lower()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_strings_from_the_run_are_escaped():
    page = render_html(_report())
    assert EVIL not in page
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page
    assert "runs/<wbr>&lt;script&gt;" in page  # the path (it may break after a separator)
    assert "&amp; clear it" in page  # the hint


def test_the_trend_line_follows_the_series():
    page = render_html(_report())
    points = re.search(r'<polyline points="([^"]+)"', page).group(1).split()
    first = [float(v) for v in points[10].split(",")]  # step 11: the trend's start
    trend = re.search(r'<line x1="([\d.]+)" y1="([\d.]+)" x2="([\d.]+)" y2="([\d.]+)" stroke="#d92d20"', page)
    x1, y1 = float(trend.group(1)), float(trend.group(2))
    assert abs(x1 - first[0]) < 0.2
    assert abs(y1 - first[1]) < 0.2  # the series is exactly linear here, so the line lies on it


def test_a_run_without_memory_data_still_renders():
    page = render_html({"summary": {}, "findings": [], "environment": {}, "detectors": {}})
    assert "No findings." in page
    assert "<svg" not in page


def test_guard_writes_html_with_a_hostile_file_name(tmp_path):
    # code compiled under a file name full of markup: the location must come out escaped
    source = (
        "def loop(model, opt, torch):\n"
        "    keep = []\n"
        "    for _ in range(60):\n"
        "        keep.append(torch.randn(512, 1024))\n"
        "        model(torch.ones(2, 4)).sum().backward()\n"
        "        opt.step()\n"
        "        opt.zero_grad()\n"
    )
    namespace = {}
    exec(compile(source, "<img src=x onerror=alert(1)>.py", "exec"), namespace)
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with gradguard.Guard(model, opt, detectors=[MemoryGrowth], policy="collect") as guard:
        namespace["loop"](model, opt, torch)
    assert [f.where for f in guard.findings] == ["keep"]
    path = tmp_path / "report.html"
    guard.write_html(path)
    page = path.read_text()
    assert "<img" not in page
    assert "&lt;img src=x onerror=alert(1)&gt;.py" in page
    assert "<polyline" in page


def test_cli_rebuilds_the_same_page_from_the_json(tmp_path, run_cli):
    report = _report()
    (tmp_path / "run.json").write_text(json.dumps(report))
    proc = run_cli("report", "run.json", "--html", "out/report.html")
    assert proc.returncode == 0, proc.stderr
    assert "GG301 memory-growth" in proc.stdout
    assert (tmp_path / "out" / "report.html").read_text() == render_html(report)
    bad = run_cli("report", "missing.json")
    assert bad.returncode == 2
    assert "cannot read report missing.json" in bad.stderr


def test_lightning_callback_reaches_the_same_page(tmp_path):
    from gradguard.integrations.lightning import GradGuardCallback

    callback = GradGuardCallback(policy="collect")
    model = nn.Linear(4, 1)
    with gradguard.Guard(model, detectors=[MemoryGrowth], policy="collect") as guard:
        for _ in range(12):  # an evaluation loop: model calls are its iterations
            model(torch.ones(2, 4))
    callback.guard = guard  # as its setup() leaves it after a run
    callback.write_html(tmp_path / "lightning.html")
    assert "<h2>Memory per step</h2>" in (tmp_path / "lightning.html").read_text()


# --------------------------------------------------------------------------- nice ticks
MiB = 2**20


def _is_nice(step):
    power = 10.0 ** math.floor(math.log10(step))
    return any(abs(step - m * power) < 1e-9 * step for m in (1, 2, 2.5, 5))


@pytest.mark.parametrize(
    ("lo", "hi", "count", "expected"),
    [
        (95, 420, 5, [100, 200, 300, 400]),  # was 95, 177, 258, ...
        (1, 80, 5, [20, 40, 60, 80]),
        (0, 1, 4, [0, 0.25, 0.5, 0.75, 1]),
        (-3, 7, 5, [-2, 0, 2, 4, 6]),
        (0.1, 0.7, 3, [0.2, 0.4, 0.6]),
        (12_000, 61_000, 5, [20_000, 30_000, 40_000, 50_000, 60_000]),
    ],
)
def test_nice_ticks(lo, hi, count, expected):
    ticks = nice_ticks(lo, hi, count)
    assert ticks == expected
    assert all(lo <= t <= hi for t in ticks)


@pytest.mark.parametrize("span", [0.003, 0.7, 1, 7.3, 79, 177.5, 325, 1e6 + 3])
@pytest.mark.parametrize("count", [1, 4, 5, 8])
def test_nice_step_is_nice_and_gives_at_most_count_intervals(span, count):
    step = nice_step(span, count)
    assert _is_nice(step)
    assert span / step <= count + 1e-9  # never more intervals than asked
    assert span / step > count / 2.5 - 1e-9  # and not far fewer: the next smaller nice step gives too many


@pytest.mark.parametrize(
    ("call", "argument"),
    [
        (lambda: nice_step(0), "span"),
        (lambda: nice_step(float("nan")), "span"),
        (lambda: nice_step(10, 0), "count"),
        (lambda: nice_ticks(5, 1), "hi"),
        (lambda: nice_ticks(float("inf"), 1), "lo"),
    ],
)
def test_nice_ticks_reject_bad_input_naming_the_argument(call, argument):
    with pytest.raises(ConfigurationError, match=f"Expected {argument} "):
        call()


def _tick_values(page, anchor):
    return [float(v.replace(",", "")) for v in re.findall(rf'text-anchor="{anchor}">([\d,.-]+)</text>', page)]


def test_plot_axes_are_ticked_at_nice_numbers():
    report = _report()
    series = report["detectors"]["GG301"]["series"]
    series["rss"] = [int((95 + 8.17 * s) * MiB) for s in series["step"]]  # 95 .. 422 MiB: awkward bounds
    report["detectors"]["GG301"]["trends"] = []
    page = render_html(report)
    for anchor in ("end", "middle"):  # the y axis (MiB), then the x axis (steps)
        values = _tick_values(page, anchor)
        assert len(values) >= 3
        steps = {round(b - a, 9) for a, b in itertools.pairwise(values)}
        assert len(steps) == 1
        step = steps.pop()
        assert _is_nice(step)
        assert all(abs(v / step - round(v / step)) < 1e-9 for v in values)
    assert _tick_values(page, "end") == [100, 200, 300, 400, 500]
    assert _tick_values(page, "middle") == [10, 20, 30, 40]


# --------------------------------------------------------------------------- markers
def _long_report(rate_after=2.0, **extra):
    """80 steps of RSS growing 2 MiB per step, then ``rate_after`` MiB per step after the finding at step 40."""
    report = _report(**extra)
    steps = list(range(1, 81))
    memory = report["detectors"]["GG301"]
    memory["series"] = {
        "step": steps,
        "rss": [int((300 + 2 * min(s, 40) + rate_after * max(s - 40, 0)) * MiB) for s in steps],
    }
    memory["trends"] = [{"signal": "rss", "slope": 2 * MiB, "intercept": 300 * MiB, "start": 11, "end": 34}]
    report["summary"].update(steps=80, iterations=80, wall_s=77.6)  # 0.97 s per step
    report["findings"][0]["data"] = {
        "signal": "rss",
        "rate_mib_per_step": 2.0,
        "growth_mib": 46.0,
        "window": [11.0, 34.0],
        "projected_oom_step": 40 + 12_400,
        "memory_free": 12_400 * 2 * MiB,
        "memory_total": 32 * 2**30,
        "clock": "step",
    }
    return report


def _finding(code, step, message="it happened", severity="warning", count=1):
    return {
        "code": code,
        "name": f"rule-{code}",
        "severity": severity,
        "message": message,
        "hint": "",
        "where": "w",
        "location": None,
        "step": step,
        "count": count,
        "data": {},
    }


def _polyline_x(page):
    points = re.search(r'<polyline points="([^"]+)"', page).group(1).split()
    return [float(p.split(",")[0]) for p in points]


def test_a_marker_at_the_step_of_each_finding():
    report = _long_report()
    report["findings"] += [_finding("GG101", 1, count=34), _finding("GG201", 25, severity="error")]
    report["findings"].append(_finding("GG405", 40, "`fc` frozen"))  # the same step as GG301
    page = render_html(report)
    xs = _polyline_x(page)  # the series has every step: point i is step i + 1
    markers = re.findall(
        r'<g id="marker-step-(\d+)" class="marker"><title>(.*?)</title><line x1="([\d.]+)"', page, re.S
    )
    assert sorted(int(step) for step, _, _ in markers) == [1, 25, 40]
    for step, title, x in markers:
        assert abs(float(x) - xs[int(step) - 1]) < 0.2
        codes = {f["code"] for f in report["findings"] if f["step"] == int(step)}
        assert all(code in title for code in codes)
    title_40 = next(t for s, t, _ in markers if s == "40")
    assert "GG301 memory-growth, once, at step 40" in title_40
    assert "fc frozen" in title_40  # plain text in the tooltip
    # each marker links to its first finding's row, and each row back to its marker
    for i, f in enumerate(report["findings"]):
        assert f'<tr id="finding-{i}">' in page
        assert f'href="#marker-step-{f["step"]}"' in page
    assert '<a href="#finding-0"><g id="marker-step-40"' in page
    assert '<a href="#finding-1"><g id="marker-step-1"' in page
    assert re.search(r'id="marker-step-40".*?>GG301 GG405</text>', page, re.S)  # both codes label one marker
    assert "34 times, from step 1" in page


def test_no_marker_where_the_plot_cannot_place_it():
    report = _long_report()
    report["findings"].append(_finding("GG101", 5000))  # restored from before a resumed run's series
    page = render_html(report)
    assert 'id="marker-step-40"' in page
    assert "marker-step-5000" not in page
    report["detectors"]["GG301"]["clock"] = "iteration"  # no optimizer: the plot counts iterations, findings steps
    page = render_html(report)
    assert 'class="marker"' not in page
    assert "marked on the plot" not in page


# --------------------------------------------------------------------------- out of memory, end of run
def test_time_to_out_of_memory_in_steps_and_wall_time():
    page = render_html(_long_report())
    assert "<strong>When found at step 40:</strong>" in page
    assert "out of memory in ~12,400 steps (~3 h 20 min at 0.97 s/step)" in page
    # as of the end of the run: 40 more steps of 2 MiB used 80 MiB of what was free
    assert "<strong>As of step 80, end of run:</strong>" in page
    assert "out of memory in ~12,400 steps (~3 h 19 min at 0.97 s/step)" in page  # 12,360 steps, 11,989 s
    assert "time per step</th><td>0.97 s (the run&#x27;s wall time over its 80 steps)" in page


def test_time_per_step_from_the_samples_times_when_the_series_has_them():
    report = _long_report()
    series = report["detectors"]["GG301"]["series"]
    series["time_s"] = [1.0 + 0.5 * s for s in series["step"]]  # 0.5 s per step, whatever the wall time says
    page = render_html(report)
    assert "out of memory in ~12,400 steps (~1 h 43 min at 0.5 s/step)" in page
    assert "0.5 s (measured over steps 11-80)" in page


def test_evidence_as_of_the_end_of_the_run_is_preferred():
    page = render_html(_long_report(rate_after=4.0))  # the leak doubled after it was found
    found = re.search(r"When found at step 40:</strong> ([^<]+)</li>", page).group(1)
    end = re.search(r"As of step 80, end of run:</strong> ([^<]+)</li>", page).group(1)
    assert found.startswith("2.00 MiB per step, +46 MiB over steps 11-34")
    assert "4.00 MiB per step over steps 41-80" in end
    assert "host memory (RSS) at 540.0 MiB (+160.0 MiB since step 40)" in end
    assert "out of memory in ~6,160 steps (~1 h 39 min at 0.97 s/step)" in end  # (24,800 - 160) MiB / 4 MiB
    # what the census counted is labelled as of the finding, not the end of the run
    assert "Live tensors counted at steps 28 and 34, when the growth was found" in page


def test_a_growth_that_stopped_projects_no_out_of_memory():
    report = _long_report(rate_after=0.0)
    page = render_html(report)
    end = re.search(r"As of step 80, end of run:</strong> ([^<]+)</li>", page).group(1)
    assert "0.00 MiB per step over steps 41-80; no longer growing, so no out of memory in sight" in end
    assert end.count("out of memory in ~") == 0


# --------------------------------------------------------------------------- markup, command
def test_markup_in_messages_and_hints_is_rendered_as_text():
    report = _report()
    report["findings"].append(
        _finding("GG101", 3, "`optimizer` applies gradients **twice**: ``backward()`` adds to ``x**2``")
        | {"hint": "Call **`optimizer.zero_grad()`** once per step"}
    )
    page = render_html(report)
    assert "`" not in page
    assert "**" not in page.replace("x**2", "")  # code keeps its stars
    assert "<code>optimizer</code> applies gradients twice: <code>backward()</code> adds to <code>x**2</code>" in page
    assert "Call <code>optimizer.zero_grad()</code> once per step" in page
    assert "<code>&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;</code> (dict" in page  # still escaped


def test_the_command_is_rendered_shell_quoted_and_escaped():
    argv = ["train.py", "--lr", "3", "--name", f"it's {EVIL}"]
    command = {"argv": argv, "script": f"/abs/{EVIL}/train.py", "module": None, "cwd": "/abs", "python": "/py3"}
    page = render_html(_report(command=command))
    assert EVIL not in page
    quoted = shlex.join(argv)
    assert quoted == "train.py --lr 3 --name 'it'\"'\"'s <script>alert(\"x\")</script>'"
    assert f'<p class="cmd">Command: <code>{html.escape(quoted)}</code></p>' in page
    assert "/<wbr>abs/<wbr>&lt;script&gt;alert(&quot;x&quot;)&lt;/<wbr>script&gt;/<wbr>train.py" in page
    assert "working directory</th><td>/<wbr>abs</td>" in page
    # the command line of `gradguard run -m pkg.train`: as recorded, with the module beside it
    argv = ["gradguard", "run", "--json", "r.json", "-m", "pkg.train", "--fast"]
    page = render_html(_report(command=dict(command, argv=argv, script=None, module="pkg.train")))
    assert '<p class="cmd">Command: <code>gradguard run --json r.json -m pkg.train --fast</code></p>' in page
    assert '<th scope="row">module</th><td>pkg.train</td>' in page
    assert '<th scope="row">script</th>' not in page


@pytest.mark.parametrize("command", [None, {}, {"argv": []}, {"argv": "train.py"}])
def test_a_report_without_a_command_still_renders(command):
    report = _report() if command is None else _report(command=command)
    page = render_html(report)
    assert "Command:" not in page
    assert "command line" not in page
    assert "<h2>Environment</h2>" in page
    assert page.rstrip().endswith("</html>")
