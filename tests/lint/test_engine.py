"""The lint engine: which files are linted, comments, select/ignore, failing rules, fixes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from gradguard.errors import ConfigurationError
from gradguard.lint import Edit, Fix, Hit, LintRule, discover, lint_file, lint_paths, lint_text, rules
from gradguard.lint.engine import check
from gradguard.lint.source import Source

TYPO = "for p in model.backbone.parameters():\n    p.requres_grad = False\n"


def _tree(tmp_path, files):
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def test_discover_searches_folders_and_skips_environments_caches_and_hidden_folders(tmp_path):
    _tree(
        tmp_path,
        {
            "train.py": "",
            "pkg/model.py": "",
            "pkg/notes.txt": "",
            "nb/explore.ipynb": "{}",
            ".venv/lib/x.py": "",
            "venv/y.py": "",
            "pkg/__pycache__/m.py": "",
            ".hidden/z.py": "",
            "build/gen.py": "",
            "gradguard.egg-info/q.py": "",
        },
    )
    found = [p.replace("\\", "/").split(str(tmp_path.name) + "/", 1)[-1] for p in discover([str(tmp_path)])]
    assert found == ["train.py", "nb/explore.ipynb", "pkg/model.py"]  # a folder's files, then its folders


def test_discover_keeps_a_named_file_whatever_its_name_and_applies_exclude(tmp_path, monkeypatch):
    _tree(tmp_path, {"bin/train": "", "a/gen_pb2.py": "", "a/keep.py": "", "data/x.py": ""})
    monkeypatch.chdir(tmp_path)
    assert discover(["bin/train"]) == ["bin/train"]
    assert discover(["."], exclude=["*_pb2.py", "data"]) == ["a/keep.py"]
    assert discover(["a", "a/keep.py"]) == ["a/gen_pb2.py", "a/keep.py"]  # each file once


def test_a_path_that_does_not_exist_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigurationError, match=r"no such file or folder: .*nope"):
        discover([str(tmp_path / "nope")])
    with pytest.raises(ConfigurationError, match="list of paths"):
        discover("train.py")  # type: ignore[arg-type]


def test_a_file_that_does_not_parse_is_reported_and_the_others_are_linted(tmp_path):
    _tree(tmp_path, {"bad.py": "loss.backward(\n", "good.py": TYPO, "latin.py": b"x = '\xe9'\n".decode("latin-1")})
    (tmp_path / "latin.py").write_bytes(b"x = '\xe9'\n")
    result = lint_paths([str(tmp_path)])
    assert [f.code for f in result.findings] == ["GG401"]
    errors = "\n".join(result.errors)
    assert "bad.py: cannot parse:1:" in errors
    assert "latin.py: cannot read" in errors
    assert result.report()["summary"]["unparsable"] == 2


def test_a_comment_on_the_line_ignores_the_finding_for_the_codes_it_names():
    assert lint_text(TYPO.replace("False\n", "False  # gradguard: ignore[GG401]\n")) == []
    assert lint_text(TYPO.replace("False\n", "False  # gradguard: ignore[requires-grad-typo]\n")) == []
    assert lint_text(TYPO.replace("False\n", "False  # gradguard: ignore\n")) == []
    kept = lint_text(TYPO.replace("False\n", "False  # gradguard: ignore[GG201]\n"))
    assert [f.code for f in kept] == ["GG401"]
    source = Source("t.py", TYPO.replace("False\n", "False  # gradguard: ignore\n"))
    assert check(source, rules())[2] == 1  # counted as suppressed


def test_select_and_ignore_take_codes_prefixes_and_names():
    assert [f.code for f in lint_text(TYPO, select="GG4")] == ["GG401"]
    assert lint_text(TYPO, select=["GG1", "GG2"]) == []
    assert lint_text(TYPO, ignore="requires-grad-typo") == []
    with pytest.raises(ConfigurationError):
        lint_text(TYPO, select="GG9")


def test_a_finding_has_the_runtime_code_name_severity_location_column_and_lines():
    (finding,) = lint_text("def freeze(model):\n    " + TYPO.replace("\n    ", "\n        "), "ft.py")
    assert (finding.code, finding.name, finding.severity.value) == ("GG401", "requires-grad-typo", "warning")
    assert (finding.location.file, finding.location.line, finding.location.function) == ("ft.py", 3, "freeze")
    assert finding.data["column"] == 9
    assert 3 in finding.data["lines"]
    assert finding.hint


class _Broken(LintRule):
    code, name, hint, static_form = "GG301", "memory-growth", "", ""

    def check(self, source):
        raise RuntimeError("boom")


class _BreaksTheFile(LintRule):
    code, name, hint, static_form = "GG301", "memory-growth", "", ""

    def check(self, source):
        node = source.tree.body[0]
        yield Hit(node, "m", fix=Fix("break it", (Edit(0, 1, "("),)))


def test_a_rule_that_fails_is_reported_as_gg000_and_the_other_rules_go_on():
    findings, _fixes, _ = check(Source("t.py", TYPO), [_Broken(), *rules()])
    assert [f.code for f in findings] == ["GG000", "GG401"]
    assert "GG301 memory-growth failed on this file with RuntimeError: boom" in findings[0].message
    assert "Traceback" in findings[0].data["traceback"]


def test_a_fix_that_would_break_the_file_is_never_applied(tmp_path):
    path = tmp_path / "t.py"
    path.write_text("x = 1\n")
    result = lint_file(str(path), [_BreaksTheFile()], fix=True)
    assert result.fixed is None
    assert result.fixes_applied == 0
    assert [f.message for f in result.findings] == ["m"]


def test_fix_applies_safe_fixes_until_nothing_is_left_to_fix(tmp_path):
    path = tmp_path / "t.py"
    path.write_text("p.requres_grad = False\nq.require_grad = True  # kept comment\n")
    result = lint_file(str(path), rules(), fix=True)
    assert result.fixed == "p.requires_grad = False\nq.requires_grad = True  # kept comment\n"
    assert result.fixes_applied == 2
    assert result.findings == []
    assert path.read_text().startswith("p.requres_grad")  # lint_file writes nothing


def test_crlf_line_endings_are_kept_by_fixes(tmp_path):
    path = tmp_path / "t.py"
    path.write_bytes(b"x = 1\r\np.requres_grad = False\r\n")
    result = lint_file(str(path), rules(), fix=True)
    assert result.fixed == "x = 1\r\np.requires_grad = False\r\n"


def test_non_ascii_text_before_a_finding_keeps_columns_and_fixes_right(tmp_path):
    path = tmp_path / "t.py"
    path.write_text("é = 1; p.requres_grad = False  # ünïcode\n", encoding="utf-8")
    result = lint_file(str(path), rules(), fix=True)
    assert result.fixed == "é = 1; p.requires_grad = False  # ünïcode\n"
    (finding,) = lint_file(str(path), rules()).findings
    assert finding.data["column"] == 8


def test_linting_imports_no_torch(tmp_path):
    (tmp_path / "t.py").write_text(TYPO)
    code = textwrap.dedent(
        f"""
        import sys
        from gradguard.lint import lint_paths
        assert [f.code for f in lint_paths([{str(tmp_path)!r}]).findings] == ["GG401"]
        assert "torch" not in sys.modules and "numpy" not in sys.modules, "torch imported"
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_a_file_with_nothing_any_rule_looks_for_is_not_parsed(tmp_path):
    path = tmp_path / "notes.py"
    path.write_text("def f(:\n")  # not Python, and nothing a rule looks for
    assert lint_file(str(path), rules()).error is None
    path.write_text("def f(:\n    p.requres_grad = False\n")
    assert "cannot parse" in (lint_file(str(path), rules()).error or "")
    every_word = "p.requres_grad = False\nopt = optim.SGD(model.parameters())\nloss.backward()\nopt.zero_grad()\n"
    assert all(rule.relevant(every_word + "opt.step()\ntorch.from_numpy(a)\n") for rule in rules())


def test_a_very_deep_expression_is_indexed_like_any_other():
    import ast

    from gradguard.lint.syntax import walk

    deep = "total = " + " + ".join(["loss"] * 2000) + "\n"  # deeper than the interpreter's recursion limit
    source = Source("t.py", deep + "for x in data:\n    loss.backward()\n    opt.step()\n")
    expected = [n for n in ast.walk(source.tree) if not isinstance(n, (ast.expr_context, ast.operator))]
    assert {id(n) for n in walk(source.tree)} == {id(n) for n in expected}
    assert [f.code for f in check(source, rules())[0]] == ["GG101"]
