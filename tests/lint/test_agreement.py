"""Static findings beside runtime ones: ``gradguard run --lint`` and ``gradguard report --lint``."""

from __future__ import annotations

import json

from gradguard.agreement import agree
from gradguard.findings import Finding, Location, Severity
from tests.helpers import BUGGY_SCRIPT

NEVER_CALLED = """
def unused(model, opt, loader):
    losses = []
    for x, y in loader:
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss)
    return losses
"""


def _finding(code, file, line, lines=()):
    return Finding(code, "n", Severity.WARNING, "m", location=Location(file, line), data={"lines": list(lines)})


def test_findings_agree_on_code_file_and_one_of_the_static_lines(tmp_path):
    runtime = {"command": {"cwd": str(tmp_path)}, "summary": {"steps": 3}, "findings": [
        _finding("GG101", "train.py", 12).to_dict(),
        _finding("GG201", "train.py", 30).to_dict(),
        _finding("GG401", "other.py", 5).to_dict(),
    ]}  # fmt: skip
    static = [
        _finding("GG101", str(tmp_path / "train.py"), 12, lines=(8, 11, 12)),  # same file, absolute
        _finding("GG201", "train.py", 29, lines=(20, 29)),  # another line: not the same finding
        _finding("GG401", "train.py", 5),  # another file
    ]
    report = agree(runtime, static, files=2)
    assert [f["seen_by"] for f in report["findings"]] == [["runtime", "static"], ["runtime"], ["runtime"]]
    assert [f["seen_by"] for f in report["static"]] == [["static", "runtime"], ["static"], ["static"]]
    assert report["summary"] == {"steps": 3, "static": 3, "static_files": 2, "agreed": 1}
    assert "seen_by" not in runtime["findings"][0]  # the input is not changed


def test_run_lint_marks_what_both_sides_saw_and_lists_what_only_the_source_shows(write_script, run_cli, tmp_path):
    script = write_script(BUGGY_SCRIPT + NEVER_CALLED)
    proc = run_cli("run", "--lint", "--json", "out.json", str(script))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    (runtime,) = report["findings"]
    assert (runtime["code"], runtime["seen_by"]) == ("GG101", ["runtime", "static"])
    static = {(f["code"], f["location"]["line"]): f["seen_by"] for f in report["static"]}
    step_line = BUGGY_SCRIPT.splitlines().index("    opt.step()") + 1
    append_line = (BUGGY_SCRIPT + NEVER_CALLED).splitlines().index("        losses.append(loss)") + 1
    assert static == {("GG101", step_line): ["static", "runtime"], ("GG201", append_line): ["static"]}
    assert report["summary"]["agreed"] == 1
    assert "gradguard lint: 2 findings in 1 file, 1 also seen while the program ran" in proc.stderr
    assert "[not seen at run time]" in proc.stderr

    again = run_cli("report", "out.json", "--lint", "--format", "json")
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["static"] == report["static"]


def test_the_html_report_lists_the_static_findings_and_which_side_saw_them():
    from gradguard.report_html import render_html

    runtime = _finding("GG101", "train.py", 12).to_dict()
    report = agree({"summary": {"steps": 3}, "findings": [runtime]}, [
        _finding("GG101", "train.py", 12, lines=(8, 12)),
        _finding("GG401", "train.py", 3),
    ], files=1)  # fmt: skip
    page = render_html(report)
    assert "In the source (gradguard lint)" in page
    assert "once, at step 0; the source shows it too" in page
    assert "also while the program ran" in page
    assert "in the source only" in page
    assert "In the source" not in render_html({"summary": {"steps": 3}, "findings": [runtime]})
