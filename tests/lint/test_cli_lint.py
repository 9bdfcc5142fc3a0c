"""``gradguard lint`` on the command line: exit codes, --fix, --diff, formats, configuration, pre-commit."""

from __future__ import annotations

import json
import pathlib

import pytest

from gradguard.cli import main

TYPO = "import torch\n\nfor p in model.backbone.parameters():\n    p.requres_grad = False\n"
REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text(TYPO)
    (tmp_path / "clean.py").write_text("x = 1\n")
    return tmp_path


def test_findings_are_printed_with_line_and_column_and_exit_1(project, capsys):
    assert main(["lint", "train.py", "clean.py"]) == 1
    out = capsys.readouterr().out
    assert "train.py:4:5: GG401 requires-grad-typo [warning] p: " in out
    assert "    fix: Spell it requires_grad" in out
    assert "gradguard lint: 1 finding in 2 files: 1 warning (1 fixable with --fix)" in out


def test_no_finding_exits_0_and_the_default_path_is_the_current_folder(project, capsys):
    (project / "train.py").write_text("x = 2\n")
    assert main(["lint"]) == 0
    assert "gradguard lint: 0 findings in 2 files" in capsys.readouterr().out


def test_exit_zero_and_usage_errors(project, capsys):
    assert main(["lint", "--exit-zero", "train.py"]) == 0
    with pytest.raises(SystemExit) as exc:
        main(["lint", "missing.py"])
    assert exc.value.code == 2
    assert "no such file or folder: missing.py" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["lint", "--fix", "--diff", "train.py"])
    assert exc.value.code == 2


def test_diff_shows_the_fixes_and_changes_nothing(project, capsys):
    assert main(["lint", "--diff", "train.py"]) == 1
    captured = capsys.readouterr()
    assert "-    p.requres_grad = False\n+    p.requires_grad = False\n" in captured.out
    assert captured.out.startswith("--- a/train.py\n+++ b/train.py\n")
    assert (project / "train.py").read_text() == TYPO
    assert main(["lint", "--diff", "clean.py"]) == 0


def test_fix_rewrites_the_file_keeps_its_mode_and_fixing_again_changes_nothing(project, capsys):
    path = project / "train.py"
    path.chmod(0o640)
    assert main(["lint", "--fix", "train.py"]) == 0  # nothing left
    assert path.read_text() == TYPO.replace("requres_grad", "requires_grad")
    assert path.stat().st_mode & 0o777 == 0o640
    assert "1 fixed" in capsys.readouterr().out
    assert main(["lint", "--fix", "train.py"]) == 0
    assert path.read_text() == TYPO.replace("requres_grad", "requires_grad")


def test_json_and_sarif_outputs(project, capsys):
    jsonschema = pytest.importorskip("jsonschema")
    assert main(["lint", "train.py", "--format", "json", "--sarif", "out.sarif", "--json", "out.json"]) == 1
    printed = json.loads(capsys.readouterr().out)
    assert printed["kind"] == "lint"
    assert [f["code"] for f in printed["findings"]] == ["GG401"]
    assert json.loads((project / "out.json").read_text())["findings"] == printed["findings"]
    sarif = json.loads((project / "out.sarif").read_text())
    schema = json.loads((REPO / "tests" / "data" / "sarif-schema-2.1.0.json").read_text())
    jsonschema.Draft4Validator(schema).validate(sarif)
    (result,) = sarif["runs"][0]["results"]
    region = result["locations"][0]["physicalLocation"]["region"]
    assert (result["ruleId"], region) == ("GG401", {"startLine": 4, "startColumn": 5})


def test_github_annotations_carry_line_and_column(project, capsys, monkeypatch):
    monkeypatch.setenv("GITHUB_WORKSPACE", str(project))
    main(["lint", "train.py", "--format", "github"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("::warning file=train.py,line=4,col=5,title=GG401 requires-grad-typo::p: ")
    assert lines[-1] == "gradguard lint: 1 finding in 1 file: 1 warning"


def test_pyproject_select_ignore_and_exclude_apply_and_options_win(project, capsys):
    (project / "vendor").mkdir()
    (project / "vendor" / "third.py").write_text(TYPO)
    (project / "pyproject.toml").write_text('[tool.gradguard]\nexclude = ["vendor"]\nignore = ["GG4"]\n')
    assert main(["lint"]) == 0
    assert main(["lint", "--select", "GG401", "--ignore", "GG1"]) == 1
    out = capsys.readouterr().out
    assert "vendor" not in out
    (project / "pyproject.toml").write_text('[tool.gradguard]\nexclude = "vendor"\nlint = 3\n')
    with pytest.raises(SystemExit):
        main(["lint"])
    assert "expected lint to be true or false" in capsys.readouterr().err


def test_unparsable_files_are_named_on_stderr_and_fail_the_run(project, capsys):
    (project / "broken.py").write_text("loss.backward(\n")
    assert main(["lint", "broken.py", "clean.py"]) == 1
    captured = capsys.readouterr()
    assert "gradguard lint: broken.py: cannot parse:1:" in captured.err
    assert "1 could not be read or parsed" in captured.out


def test_the_pre_commit_hook_runs_gradguard_lint_on_python_and_notebooks():
    text = (REPO / ".pre-commit-hooks.yaml").read_text()
    yaml = pytest.importorskip("yaml")
    (hook,) = yaml.safe_load(text)
    assert hook["id"] == "gradguard-lint"
    assert hook["entry"] == "gradguard lint"
    assert set(hook["types_or"]) == {"python", "jupyter"}
    assert hook["language"] == "python"
