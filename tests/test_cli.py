import json
import sys

import pytest

import gradguard
from gradguard.cli import EXIT_STRICT
from tests.helpers import BUGGY_SCRIPT

BUGGY = BUGGY_SCRIPT


def _report(tmp_path, name="out.json"):
    return json.loads((tmp_path / name).read_text())


def test_script_runs_as_python_would_run_it(write_script, run_cli, tmp_path):
    script = write_script(
        """
        import json, os, sys
        import helper_mod  # importable because the script's folder is first on sys.path
        json.dump({"argv": sys.argv, "name": __name__, "path0": sys.path[0]}, open("seen.json", "w"))
        sys.exit(7)
        """
    )
    (tmp_path / "helper_mod.py").write_text("")
    proc = run_cli("run", "--json", "out.json", str(script), "--flag", "value", "-x")
    assert proc.returncode == 7, proc.stderr
    seen = json.loads((tmp_path / "seen.json").read_text())
    assert seen == {"argv": [str(script), "--flag", "value", "-x"], "name": "__main__", "path0": str(tmp_path)}
    assert _report(tmp_path)["findings"] == []


def test_findings_survive_an_exception_in_the_script(write_script, run_cli, tmp_path):
    script = write_script(BUGGY + "raise ValueError('crash after training')\n")
    proc = run_cli("run", "--json", "out.json", str(script))
    assert proc.returncode == 1
    assert "ValueError: crash after training" in proc.stderr
    assert "runpy" not in proc.stderr  # the traceback starts in the user's script
    report = _report(tmp_path)
    assert [f["code"] for f in report["findings"]] == ["GG101"]
    assert "static" not in report  # linted only with --lint
    assert "seen_by" not in report["findings"][0]
    assert "1 finding" in proc.stderr


def test_findings_survive_sys_exit_with_a_message(write_script, run_cli, tmp_path):
    script = write_script(BUGGY + "import sys\nsys.exit('bye')\n")
    proc = run_cli("run", "--json", "out.json", str(script))
    assert proc.returncode == 1
    assert "bye" in proc.stderr
    assert len(_report(tmp_path)["findings"]) == 1


def test_the_report_is_written_as_soon_as_something_is_found(write_script, run_cli, tmp_path):
    # a hard kill skips every clean-up; what was found must already be on disk
    script = write_script(BUGGY + "import os\nos._exit(9)\n")
    proc = run_cli("run", "--json", "out.json", str(script))
    assert proc.returncode == 9
    assert [f["code"] for f in _report(tmp_path)["findings"]] == ["GG101"]


def test_strict_fails_on_findings(write_script, run_cli):
    script = write_script(BUGGY)
    assert run_cli("run", "--strict", str(script)).returncode == EXIT_STRICT
    assert run_cli("run", "--strict", "--ignore", "GG1", str(script)).returncode == 0


def test_policy_raise_stops_the_script(write_script, run_cli, tmp_path):
    script = write_script(BUGGY)
    proc = run_cli("run", "--policy", "raise", "--json", "out.json", str(script))
    assert proc.returncode == 1
    assert "FindingError" in proc.stderr
    assert len(_report(tmp_path)["findings"]) == 1


def test_no_json_writes_nothing(write_script, run_cli, tmp_path):
    script = write_script(BUGGY)
    proc = run_cli("run", "--no-json", str(script))
    assert proc.returncode == 0
    assert not list(tmp_path.glob("*.json"))
    assert "GG101" in proc.stderr


@pytest.mark.parametrize(
    "args",
    [
        ("run", "missing.py"),
        ("run", "--policy", "loud", "x.py"),
        ("run", "--bogus", "x.py"),
        ("run", "--select", "XX9", "train.py"),
        ("run", "--budget", "0", "train.py"),
        ("run", "--budget", "some", "train.py"),
        ("explain", "GG999"),
        ("frobnicate",),
    ],
)
def test_bad_usage_is_one_line_and_exit_code_2(args, write_script, run_cli):
    write_script("print('never')\n")
    proc = run_cli(*args)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("gradguard: error:")
    assert "never" not in proc.stdout


@pytest.mark.parametrize(("budget", "expected"), [("all", None), ("2", 2)])
def test_the_budget_option_reaches_the_guard(budget, expected, monkeypatch, tmp_path):
    from gradguard import cli

    seen = {}

    def fake_install(**kwargs):
        seen.update(kwargs)
        raise gradguard.ConfigurationError("stop here")

    monkeypatch.setattr(sys.modules["gradguard.install"], "install", fake_install)
    script = tmp_path / "train.py"
    script.write_text("print('never')\n")
    with pytest.raises(SystemExit):
        cli.main(["run", "--budget", budget, str(script)])
    assert seen["budget"] == expected


@pytest.mark.parametrize("rule", ["GG101", "missing-zero-grad"])
def test_explain_prints_the_rule_page(rule, run_cli):
    proc = run_cli("explain", rule)
    assert proc.returncode == 0
    page = proc.stdout
    assert page.startswith("GG101 missing-zero-grad")
    for section in ("What it detects", "Why it matters", "How to fix it", "Example"):
        assert section in page


def test_rules_lists_every_code(run_cli):
    from gradguard import RULES

    out = run_cli("rules").stdout
    for code, name in RULES.items():
        assert f"{code}  {name}" in out
