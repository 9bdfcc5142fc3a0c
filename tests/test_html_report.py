"""The HTML report: one self-contained page, every string escaped, rebuilt from the JSON alone."""

import json
import re

import torch
from torch import nn

import gradguard
from gradguard.detectors import MemoryGrowth
from gradguard.report_html import render_html

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
    assert "runs/&lt;script&gt;" in page  # the path
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
