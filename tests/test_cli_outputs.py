"""The command line's outputs: formats, report files, paths checked first, config, -m, report input."""

import json
import os
import stat
import subprocess
import sys

import pytest

from gradguard import cli
from gradguard.cli import EXIT_STRICT, EXIT_USAGE
from gradguard.report import write_text_atomic
from tests.helpers import BUGGY_SCRIPT

BUGGY = BUGGY_SCRIPT


@pytest.fixture
def in_dir(tmp_path, monkeypatch):
    """Run in tmp_path, with no pyproject.toml above it to read settings from."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("gradguard.config.find_pyproject", lambda start=None: _local_pyproject(tmp_path))
    return tmp_path


def _local_pyproject(folder):
    path = folder / "pyproject.toml"
    return str(path) if path.exists() else None


def _main(*args):
    """``gradguard ARGS`` in this process; the exit code (a usage error exits through SystemExit)."""
    try:
        return cli.main(list(args))
    except SystemExit as exc:
        return exc.code


def _write_report(path, findings=(), **extra):
    report = {"version": 1, "summary": {"steps": 5, "overhead_s": 0.0, "wall_s": 1.0}, "findings": list(findings)}
    report.update(extra)
    path.write_text(json.dumps(report))
    return path


WARNING = {
    "code": "GG101",
    "name": "missing-zero-grad",
    "severity": "warning",
    "message": "applied twice",
    "hint": "Call optimizer.zero_grad()",
    "location": {"file": "train.py", "line": 9, "function": "<module>"},
    "where": "opt",
    "step": 2,
    "count": 3,
    "data": {},
}
INFO = {**WARNING, "code": "GG301", "name": "memory-growth", "severity": "info", "where": "rss"}


# ------------------------------------------------------------------ paths checked before the run
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--json", "out"), "--json out: is a directory"),
        (("--html", "plain.txt/r.html"), "is not a directory"),
        (("--sarif", "/proc/r.sarif"), "--sarif /proc/r.sarif: cannot write in /proc"),
        (("--no-json", "--json", "a.json"), "--no-json and --json conflict"),
        (("--json", "a.json", "--sarif", "./a.json"), "--json and --sarif name the same file"),
        (("--json", "train.py"), "--json train.py: that is the program to run"),
    ],
)
def test_a_bad_output_path_stops_before_the_script_runs(args, expected, in_dir, capsys):
    (in_dir / "out").mkdir()
    (in_dir / "plain.txt").write_text("")
    (in_dir / "train.py").write_text("open('ran', 'w').close()\n")
    assert _main("run", *args, "train.py") == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("gradguard: error: ")
    assert expected in err
    assert not (in_dir / "ran").exists()


def test_a_missing_report_folder_is_made(in_dir, capsys):
    (in_dir / "train.py").write_text("print('ran')\n")
    assert _main("run", "--json", "deep/er/r.json", "train.py") == 0
    assert json.loads((in_dir / "deep/er/r.json").read_text())["findings"] == []


# ------------------------------------------------------------------ file modes
@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_reports_get_the_mode_the_umask_gives(umask, mode, tmp_path):
    old = os.umask(umask)
    try:
        write_text_atomic("{}", tmp_path / "r.json")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "r.json").st_mode) == mode


def test_a_replaced_report_keeps_its_mode(tmp_path):
    path = tmp_path / "r.json"
    path.write_text("old")
    os.chmod(path, 0o640)
    write_text_atomic("new", path)
    assert path.read_text() == "new"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert os.listdir(tmp_path) == ["r.json"]  # no temporary file left behind


# ------------------------------------------------------------------ gradguard report
@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"a": 1}', 'is not a gradguard report: expected a "version" key'),
        ('{"version": 7, "summary": {}, "findings": []}', "is a version 7 report; this gradguard"),
        ('{"version": "1", "summary": {}, "findings": []}', "expected an integer version"),
        ('{"version": 1, "summary": {}, "findings": {}}', 'expected a "findings" list'),
        ('{"version": 1, "summary": {}, "findings": [{"code": "GG101"}]}', "findings[0] is not a finding"),
        ('{"version": 1, "summary": {"steps": "x"}, "findings": []}', "summary.steps must be a number"),
        ("[1, 2]", "expected a JSON object but got list"),
        ("{not json", "is not JSON"),
    ],
)
def test_report_rejects_what_is_not_a_report_in_one_line(content, expected, in_dir, capsys):
    (in_dir / "r.json").write_text(content)
    assert _main("report", "r.json") == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("gradguard: error: r.json")
    assert expected in err


def test_report_of_a_missing_file(in_dir, capsys):
    assert _main("report", "nope.json") == EXIT_USAGE
    assert "cannot read report nope.json: No such file or directory" in capsys.readouterr().err


def test_report_strict_fails_on_a_warning_not_on_info(in_dir, capsys):
    _write_report(in_dir / "warn.json", [WARNING])
    _write_report(in_dir / "info.json", [INFO])
    assert _main("report", "--strict", "warn.json") == EXIT_STRICT
    assert _main("report", "--strict", "info.json") == 0
    assert _main("report", "warn.json") == 0


def test_report_formats(in_dir, capsys):
    _write_report(in_dir / "r.json", [WARNING])
    assert _main("report", "--format", "github", "r.json") == 0
    out = capsys.readouterr().out
    assert out.startswith("::warning file=train.py,line=9,title=GG101 missing-zero-grad::")
    assert _main("report", "--format", "sarif", "--sarif", "out.sarif", "r.json") == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["version"] == "2.1.0"
    assert printed["runs"][0]["results"][0]["ruleId"] == "GG101"
    written = json.loads((in_dir / "out.sarif").read_text())
    assert written["runs"][0]["results"] == printed["runs"][0]["results"]
    assert _main("report", "--format", "json", "r.json") == 0
    assert json.loads(capsys.readouterr().out)["findings"] == [WARNING]


# ------------------------------------------------------------------ gradguard run, in this process
def test_run_writes_every_report_and_prints_the_format(in_dir, capsys):
    (in_dir / "train.py").write_text(BUGGY)
    code = _main(
        "run", "--policy", "collect", "--json", "r.json", "--sarif", "r.sarif", "--format", "github", "train.py"
    )
    assert code == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("::warning file=train.py,line=10,title=GG101 missing-zero-grad::")
    assert "gradguard: 1 finding in 4 steps" in captured.err
    report = json.loads((in_dir / "r.json").read_text())
    assert [f["code"] for f in report["findings"]] == ["GG101"]
    assert report["command"]["argv"][:2] == ["gradguard", "run"]
    assert report["command"]["script"] == str(in_dir / "train.py")
    sarif = json.loads((in_dir / "r.sarif").read_text())
    assert [r["ruleId"] for r in sarif["runs"][0]["results"]] == ["GG101"]


def test_a_comment_at_the_line_suppresses_the_finding(in_dir, capsys):
    (in_dir / "train.py").write_text(BUGGY.replace("opt.step()", "opt.step()  # gradguard: ignore[GG101]"))
    assert _main("run", "--policy", "collect", "--strict", "--json", "r.json", "train.py") == 0
    report = json.loads((in_dir / "r.json").read_text())
    assert report["findings"] == []
    assert [f["code"] for f in report["suppressed"]] == ["GG101"]
    assert report["summary"]["suppressed"] == 1
    assert "0 findings in 4 steps, 1 suppressed by comments" in capsys.readouterr().err


def test_a_comment_for_another_rule_suppresses_nothing(in_dir, capsys):
    (in_dir / "train.py").write_text(BUGGY.replace("opt.step()", "opt.step()  # gradguard: ignore[graph-retained]"))
    assert _main("run", "--policy", "collect", "--strict", "--no-json", "train.py") == EXIT_STRICT


# ------------------------------------------------------------------ [tool.gradguard]
def test_pyproject_settings_apply_and_options_win(in_dir, capsys):
    (in_dir / "train.py").write_text(BUGGY)
    (in_dir / "pyproject.toml").write_text(
        '[tool.gradguard]\nstrict = true\npolicy = "collect"\njson = "reports/g.json"\nformat = "github"\n'
    )
    assert _main("run", "train.py") == EXIT_STRICT
    assert "::warning file=train.py" in capsys.readouterr().out
    assert (in_dir / "reports/g.json").exists()
    assert _main("run", "--ignore", "GG1", "--format", "text", "--json", "other.json", "train.py") == 0
    assert "::warning" not in capsys.readouterr().out
    assert (in_dir / "other.json").exists()


def test_pyproject_select_keeps_only_those_rules(in_dir, capsys):
    (in_dir / "train.py").write_text(BUGGY)
    (in_dir / "pyproject.toml").write_text('[tool.gradguard]\nselect = ["GG2"]\npolicy = "collect"\njson = false\n')
    assert _main("run", "--strict", "train.py") == 0
    assert not (in_dir / "gradguard-report.json").exists()


@pytest.mark.parametrize(
    ("table", "expected"),
    [
        ('selct = ["GG1"]', "unknown key 'selct'; expected one of select, ignore"),
        ("strict = 1", "expected strict to be true or false but got 1"),
        ('format = "xml"', "expected format to be one of text, json, sarif, github but got 'xml'"),
        ('ignore = ["GG9"]', "Expected ignore to hold code prefixes or rule names but got 'GG9'"),
        ("budget = 0", "budget to be a positive number of tensors or 'all' but got 0"),
        ("json = 3", "expected json to be a path or false but got 3"),
        ("[oops", "not valid TOML"),
    ],
)
def test_bad_pyproject_settings_are_one_line_errors(table, expected, in_dir, capsys):
    (in_dir / "train.py").write_text("open('ran', 'w').close()\n")
    (in_dir / "pyproject.toml").write_text(f"[tool.gradguard]\n{table}\n")
    assert _main("run", "train.py") == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert expected in err
    assert not (in_dir / "ran").exists()


def test_the_nearest_pyproject_with_a_table_is_found(tmp_path):
    from gradguard.config import find_pyproject, load_config

    (tmp_path / "pyproject.toml").write_text('[tool.gradguard]\nhtml = "r/page.html"\n')
    inner = tmp_path / "pkg" / "sub"
    inner.mkdir(parents=True)
    (tmp_path / "pkg" / "pyproject.toml").write_text("[project]\nname = 'x'\n")  # no table: skipped
    assert find_pyproject(inner) == str(tmp_path / "pyproject.toml")
    config = load_config(find_pyproject(inner))
    assert config.html == str(tmp_path / "r" / "page.html")  # relative to the pyproject's folder


# ------------------------------------------------------------------ how the program runs
def test_script_sees_argv_as_given_and_an_absolute_file(in_dir, capsys):
    (in_dir / "train.py").write_text(
        "import json, pathlib, sys\n"
        "pathlib.Path('seen.json').write_text(json.dumps({'argv': sys.argv, 'file': __file__, 'name': __name__}))\n"
    )
    assert _main("run", "--no-json", "train.py", "--lr", "3") == 0
    seen = json.loads((in_dir / "seen.json").read_text())
    assert seen == {"argv": ["train.py", "--lr", "3"], "file": str(in_dir / "train.py"), "name": "__main__"}


def test_run_m_runs_a_module_as_python_m_does(in_dir, capsys):
    pkg = in_dir / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "train.py").write_text(
        "import json, pathlib, sys\n"
        "seen = {'argv': sys.argv, 'name': __name__, 'path0': sys.path[0]}\n"
        "pathlib.Path('seen.json').write_text(json.dumps(seen))\n"
        "sys.exit(4)\n"
    )
    assert _main("run", "--json", "r.json", "-m", "mypkg.train", "--json", "x") == 4
    seen = json.loads((in_dir / "seen.json").read_text())
    assert seen == {"argv": [str(pkg / "train.py"), "--json", "x"], "name": "__main__", "path0": str(in_dir)}
    command = json.loads((in_dir / "r.json").read_text())["command"]
    assert command["module"] == "mypkg.train"
    assert command["script"] is None


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("run", "-m", "no_such_module_here"), "no module named no_such_module_here"),
        (("run",), "expected a SCRIPT to run, or -m MODULE"),
        (("run", "--json", "a.json"), "expected a SCRIPT to run, or -m MODULE"),
    ],
)
def test_run_without_a_program(args, expected, in_dir, capsys):
    assert _main(*args) == EXIT_USAGE
    assert expected in capsys.readouterr().err


# ------------------------------------------------------------------ a fast command line
@pytest.mark.parametrize("args", [["--help"], ["--version"], ["rules"], ["explain", "GG201"], ["run", "--help"]])
def test_the_quick_commands_do_not_import_torch(args):
    code = (
        "import sys\nfrom gradguard.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout


def test_lightning_without_the_extra_says_how_to_install_it(monkeypatch):
    for name in ("lightning", "lightning.pytorch"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "gradguard.lightning", raising=False)
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'gradguard\[lightning\]'"):
        import gradguard.lightning  # noqa: F401
