import copy
import json
import os
import pathlib
import subprocess
import sys

import jsonschema
import pytest

from gradguard import pages
from gradguard._version import __version__
from gradguard.errors import ConfigurationError
from gradguard.explain import plain_text, render_terminal
from gradguard.findings import Finding, Location, Severity
from gradguard.formats import FORMATS, relative_path, render, to_github, to_sarif
from gradguard.report import format_summary, write_json_atomic
from gradguard.rules import RULES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA_PATH = os.path.join(REPO, "tests", "data", "sarif-schema-2.1.0.json")


@pytest.fixture(scope="module")
def validator():
    with open(SCHEMA_PATH, encoding="utf-8") as fh:
        schema = json.load(fh)
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def make_report(findings, *, command=None, steps=12):
    counts = {s.value: sum(f.severity is s for f in findings) for s in Severity}
    report = {
        "version": 1,
        "gradguard": "9.8.7",
        "created": "2025-01-02T03:04:05+00:00",
        "summary": {
            "steps": steps,
            "iterations": steps,
            "findings": len(findings),
            "by_severity": counts,
            "overhead_s": 0.25,
            "wall_s": 3.5,
            "detectors": ["GG101", "GG301"],
        },
        "environment": {"python": "3.11.0", "torch": "2.13.0", "platform": "Linux", "cuda": False, "device": "cpu"},
        "findings": [f.to_dict() for f in findings],
        "detectors": {"GG301": {"samples": [1, 2, 3]}},
    }
    if command is not None:
        report["command"] = command
    return report


def findings_in(root: pathlib.Path):
    """One finding of each severity, inside and outside root, with and without a location."""
    outside = root.parent / "elsewhere" / "lib.py"
    return [
        Finding(
            "GG101",
            "missing-zero-grad",
            Severity.ERROR,
            "gradients applied 2 times",
            hint="Call optimizer.zero_grad() before backward()",
            location=Location(str(root / "pkg" / "train.py"), 20, "main"),
            where="opt",
            step=3,
            count=2,
            data={"params": ("fc.weight", "fc.bias"), "ratio": float("nan"), "obj": object()},
        ),
        Finding(
            "GG402",
            "frozen-param-updated",
            Severity.WARNING,
            "frozen parameter moved",
            hint="Leave it out of the optimizer",
            location=Location(str(outside), 7, "step"),
            where="encoder.weight",
        ),
        Finding("GG601", "accumulation-batchnorm", Severity.INFO, "statistics per micro-batch", where="bn"),
        Finding("GG301", "memory-growth", Severity.WARNING, "grew 5 MB per step", where=""),
    ]


def command_for(root: pathlib.Path):
    return {
        "argv": ["gradguard", "run", "train.py", "--lr", "0.1 0.2"],
        "script": "train.py",
        "module": None,
        "cwd": str(root),
        "python": sys.executable,
    }


# --- SARIF -----------------------------------------------------------------------------------


@pytest.mark.parametrize("with_command", [False, True])
@pytest.mark.parametrize("explicit_root", [False, True])
def test_sarif_is_valid_against_the_schema(tmp_path, monkeypatch, validator, with_command, explicit_root):
    root = tmp_path / "repo"
    root.mkdir()
    monkeypatch.chdir(tmp_path if explicit_root else root)
    report = make_report(findings_in(root), command=command_for(root) if with_command else None)
    log = to_sarif(report, root=str(root) if explicit_root else None)
    errors = [e.message for e in validator.iter_errors(log)]
    assert errors == []
    text = render(report, "sarif", root=str(root))
    assert text.endswith("\n")
    assert list(validator.iter_errors(json.loads(text))) == []
    assert "NaN" not in text  # strict JSON: code scanning rejects NaN


def test_the_schema_check_catches_a_broken_log(tmp_path, validator):
    log = to_sarif(make_report(findings_in(tmp_path)), root=str(tmp_path))
    broken = copy.deepcopy(log)
    broken["runs"][0]["results"][0]["level"] = "warn"
    assert list(validator.iter_errors(broken))
    broken = copy.deepcopy(log)
    broken["runs"][0]["results"][0]["locations"][0]["physicalLocation"]["region"]["startLine"] = 0
    assert list(validator.iter_errors(broken))


def test_sarif_header_and_driver(tmp_path):
    log = to_sarif(make_report([]), root=str(tmp_path))
    assert log["version"] == "2.1.0"
    assert log["$schema"] == "https://json.schemastore.org/sarif-2.1.0.json"
    (run,) = log["runs"]
    driver = run["tool"]["driver"]
    assert driver["name"] == "gradguard"
    assert driver["version"] == "9.8.7"
    assert driver["informationUri"] == "https://github.com/gradguard/gradguard"
    assert run["results"] == []
    assert run["originalUriBaseIds"]["%SRCROOT%"]["uri"] == tmp_path.as_uri() + "/"
    assert run["properties"]["summary"]["steps"] == 12
    del_version = make_report([])
    del del_version["gradguard"]
    assert to_sarif(del_version, root=str(tmp_path))["runs"][0]["tool"]["driver"]["version"] == __version__


def test_sarif_rules_are_the_whole_rule_table(tmp_path):
    rules = to_sarif(make_report([]), root=str(tmp_path))["runs"][0]["tool"]["driver"]["rules"]
    assert [r["id"] for r in rules] == list(RULES)
    for rule in rules:
        code = rule["id"]
        assert rule["name"] == RULES[code]
        assert rule["shortDescription"]["text"] == plain_text(" ".join(pages.summary(code).split()))
        assert "\n" not in rule["shortDescription"]["text"]
        assert "`" not in rule["shortDescription"]["text"]
        text = render_terminal(pages.markdown(code), width=100)  # plain text, no markup
        assert rule["fullDescription"] == {"text": text, "markdown": pages.markdown(code)}
        assert rule["help"] == {"text": text, "markdown": pages.markdown(code)}
        level = {"info": "note", "warning": "warning", "error": "error"}[pages.default_severity(code)]
        assert rule["defaultConfiguration"]["level"] == level
        assert "pytorch" in rule["properties"]["tags"]
    levels = {r["id"]: r["defaultConfiguration"]["level"] for r in rules}
    assert levels["GG101"] == "warning"
    assert levels["GG601"] == "note"  # BatchNorm under accumulation is info
    by_id = {r["id"]: r for r in rules}
    assert "internal" in by_id["GG000"]["properties"]["tags"]
    assert "reserved" not in by_id["GG101"]["properties"]["tags"]


def test_sarif_results_point_at_their_rules_with_mapped_levels(tmp_path):
    findings = findings_in(tmp_path)
    run = to_sarif(make_report(findings), root=str(tmp_path))["runs"][0]
    rules = run["tool"]["driver"]["rules"]
    results = run["results"]
    assert [r["ruleId"] for r in results] == [f.code for f in findings]
    for result in results:
        assert rules[result["ruleIndex"]]["id"] == result["ruleId"]
    assert [r["level"] for r in results] == ["error", "warning", "note", "warning"]


def test_sarif_result_message_and_properties(tmp_path):
    findings = findings_in(tmp_path)
    results = to_sarif(make_report(findings), root=str(tmp_path))["runs"][0]["results"]
    first = results[0]
    assert first["message"]["text"] == (
        "opt: gradients applied 2 times (seen 2 times)\nfix: Call optimizer.zero_grad() before backward()"
    )
    assert first["properties"]["step"] == 3
    assert first["properties"]["count"] == 2
    assert first["properties"]["where"] == "opt"
    assert first["properties"]["function"] == "main"
    data = first["properties"]["data"]
    assert data["params"] == ["fc.weight", "fc.bias"]
    assert data["ratio"] == "nan"
    assert data["obj"].startswith("<object object")
    json.dumps(data, allow_nan=False)
    assert results[3]["message"]["text"] == "grew 5 MB per step"  # no where, no hint


def test_sarif_locations_inside_and_outside_root(tmp_path):
    findings = findings_in(tmp_path)
    results = to_sarif(make_report(findings), root=str(tmp_path))["runs"][0]["results"]
    inside = results[0]["locations"][0]["physicalLocation"]
    assert inside["artifactLocation"] == {"uri": "pkg/train.py", "uriBaseId": "%SRCROOT%"}
    assert inside["region"] == {"startLine": 20}
    outside = results[1]["locations"][0]["physicalLocation"]
    assert outside["artifactLocation"] == {"uri": (tmp_path.parent / "elsewhere" / "lib.py").as_uri()}
    assert outside["region"] == {"startLine": 7}
    assert "locations" not in results[2]  # no location, no script: a result of the whole run


def test_sarif_relative_paths_are_taken_from_the_run_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "sub dir"
    f = Finding("GG101", "missing-zero-grad", Severity.WARNING, "m", location=Location("train.py", 4))
    report = make_report([f], command=command_for(run_dir))
    loc = to_sarif(report, root=str(tmp_path))["runs"][0]["results"][0]["locations"][0]["physicalLocation"]
    assert loc["artifactLocation"] == {"uri": "sub%20dir/train.py", "uriBaseId": "%SRCROOT%"}
    # without the command, relative to the current directory
    loc = to_sarif(make_report([f]))["runs"][0]["results"][0]["locations"][0]["physicalLocation"]
    assert loc["artifactLocation"] == {"uri": "train.py", "uriBaseId": "%SRCROOT%"}


def test_sarif_finding_without_location_is_placed_on_the_script(tmp_path):
    findings = [
        Finding("GG601", "accumulation-batchnorm", Severity.INFO, "statistics per micro-batch", where="bn"),
        Finding("GG101", "missing-zero-grad", Severity.WARNING, "m", location=Location("<stdin>", 3)),
    ]
    results = to_sarif(make_report(findings, command=command_for(tmp_path)), root=str(tmp_path))["runs"][0]["results"]
    for result in results:
        (loc,) = result["locations"]
        assert loc["physicalLocation"] == {"artifactLocation": {"uri": "train.py", "uriBaseId": "%SRCROOT%"}}
    module_run = dict(command_for(tmp_path), script=None, module="pkg.train")
    results = to_sarif(make_report(findings, command=module_run), root=str(tmp_path))["runs"][0]["results"]
    assert all("locations" not in r for r in results)


def test_sarif_invocation_with_and_without_command(tmp_path):
    (invocation,) = to_sarif(make_report([]), root=str(tmp_path))["runs"][0]["invocations"]
    assert invocation == {"executionSuccessful": True}
    command = command_for(tmp_path)
    (invocation,) = to_sarif(make_report([], command=command), root=str(tmp_path))["runs"][0]["invocations"]
    assert invocation["executionSuccessful"] is True
    assert invocation["commandLine"] == "gradguard run train.py --lr '0.1 0.2'"
    assert invocation["arguments"] == command["argv"]
    assert invocation["workingDirectory"] == {"uri": tmp_path.as_uri() + "/"}
    assert invocation["executableLocation"] == {"uri": pathlib.Path(sys.executable).as_uri()}
    assert invocation["properties"] == {"script": "train.py"}


def test_sarif_unknown_code_has_no_rule_index(tmp_path, validator):
    f = Finding("GG999", "from-the-future", Severity.WARNING, "m")
    log = to_sarif(make_report([f]), root=str(tmp_path))
    (result,) = log["runs"][0]["results"]
    assert result["ruleId"] == "GG999"
    assert "ruleIndex" not in result
    assert list(validator.iter_errors(log)) == []


def _fingerprints(report, root):
    return [r["partialFingerprints"]["gradguard/v1"] for r in to_sarif(report, root=root)["runs"][0]["results"]]


def test_sarif_fingerprints_are_stable_and_distinct(tmp_path):
    base = Finding(
        "GG101", "missing-zero-grad", Severity.WARNING, "applied 2 times", location=Location("t.py", 10, "main")
    )
    variants = [
        base,
        Finding("GG102", "zero-grad-before-step", Severity.WARNING, "m", location=Location("t.py", 10, "main")),
        Finding("GG101", "missing-zero-grad", Severity.WARNING, "m", location=Location("t.py", 10, "main"), where="o"),
        Finding("GG101", "missing-zero-grad", Severity.WARNING, "m", location=Location("u.py", 10, "main")),
        Finding("GG101", "missing-zero-grad", Severity.WARNING, "m", location=Location("t.py", 10, "loop")),
        Finding("GG101", "missing-zero-grad", Severity.WARNING, "m"),
    ]
    report = make_report(variants)
    first = _fingerprints(report, str(tmp_path))
    assert first == _fingerprints(copy.deepcopy(report), str(tmp_path))
    assert len(set(first)) == len(first)
    # the line, the message, the step and the count do not change the fingerprint
    moved = Finding(
        "GG101", "missing-zero-grad", Severity.ERROR, "applied 9 times", location=Location("t.py", 55, "main")
    )
    moved = Finding.from_dict(dict(moved.to_dict(), step=40, count=3))
    assert _fingerprints(make_report([moved]), str(tmp_path)) == first[:1]


def test_sarif_fingerprints_of_one_place_seen_on_two_lines(tmp_path):
    def at(line):
        return Finding("GG101", "missing-zero-grad", Severity.WARNING, "m", location=Location("t.py", line, "main"))

    prints = _fingerprints(make_report([at(30), at(10)]), str(tmp_path))
    assert len(set(prints)) == 2
    # numbered in the order of their lines, not of the report
    assert _fingerprints(make_report([at(12), at(32)]), str(tmp_path)) == prints[::-1]


# --- GitHub workflow commands ----------------------------------------------------------------


def test_github_exact_lines(tmp_path):
    findings = [
        Finding(
            "GG301",
            "memory-growth",
            Severity.INFO,
            "grew 5%\r\nper step",
            hint="Free it: del x",
            location=Location(str(tmp_path / "d:ir" / "a,b.py"), 8, "main"),
            where="model",
        ),
        Finding(
            "GG101",
            "missing-zero-grad",
            Severity.ERROR,
            "applied twice",
            hint="Call zero_grad()",
            location=Location(str(tmp_path / "train.py"), 20),
            where="opt",
            count=3,
        ),
        Finding("GG999", "odd:name,x%", Severity.WARNING, "50% more", where="w"),
    ]
    out = to_github(make_report(findings, steps=7), root=str(tmp_path))
    assert out.splitlines() == [
        "::error file=train.py,line=20,title=GG101 missing-zero-grad::"
        "opt: applied twice (seen 3 times)%0Afix: Call zero_grad()",
        "::warning title=GG999 odd%3Aname%2Cx%25::w: 50%25 more",
        "::notice file=d%3Air/a%2Cb.py,line=8,title=GG301 memory-growth::"
        "model: grew 5%25%0D%0Aper step%0Afix: Free it: del x",
        "gradguard: 3 findings in 7 steps: 1 error, 1 warning, 1 info",
    ]
    assert out.endswith("\n")


def test_github_paths_outside_root_stay_absolute(tmp_path):
    root = tmp_path / "repo"
    outside = tmp_path / "lib.py"
    f = Finding("GG402", "frozen-param-updated", Severity.WARNING, "moved", location=Location(str(outside), 3))
    first = to_github(make_report([f]), root=str(root)).splitlines()[0]
    assert first == f"::warning file={str(outside).replace(':', '%3A')},line=3,title=GG402 frozen-param-updated::moved"


def test_github_relative_to_workspace(tmp_path, monkeypatch):
    workspace = tmp_path / "ws"
    run_dir = workspace / "exp"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GITHUB_WORKSPACE", str(workspace))
    f = Finding("GG101", "missing-zero-grad", Severity.WARNING, "m", location=Location("train.py", 5))
    report = make_report([f], command=command_for(run_dir))
    assert to_github(report).splitlines()[0] == "::warning file=exp/train.py,line=5,title=GG101 missing-zero-grad::m"
    # an explicit root wins over the workspace
    assert to_github(report, root=str(run_dir)).splitlines()[0].startswith("::warning file=train.py,")
    # without the workspace: the current directory
    monkeypatch.delenv("GITHUB_WORKSPACE")
    assert to_github(report).splitlines()[0].startswith("::warning file=ws/exp/train.py,")


def test_github_summary_without_findings():
    assert to_github(make_report([], steps=5)) == "gradguard: 0 findings in 5 steps\n"


def test_github_summary_counts_plural(tmp_path):
    findings = [Finding("GG101", "missing-zero-grad", Severity.WARNING, "m", where=str(i)) for i in range(2)]
    findings += [Finding("GG601", "accumulation-batchnorm", Severity.INFO, "m", where=str(i)) for i in range(2)]
    last = to_github(make_report(findings, steps=1)).splitlines()[-1]
    assert last == "gradguard: 4 findings in 1 steps: 2 warnings, 2 info"


def test_relative_path(tmp_path):
    root = str(tmp_path)
    assert relative_path(str(tmp_path / "a" / "b.py"), root) == ("a/b.py", True)
    assert relative_path("b.py", root, base=str(tmp_path / "a")) == ("a/b.py", True)
    assert relative_path("../x.py", root, base=root) == (str(tmp_path.parent / "x.py"), False)
    assert relative_path(str(tmp_path) + "-other/x.py", root) == (str(tmp_path) + "-other/x.py", False)


# --- text, json, dispatch --------------------------------------------------------------------


def test_text_matches_the_summary(tmp_path):
    findings = findings_in(tmp_path)
    expected = format_summary(findings, steps=12, overhead_s=0.25, wall_s=3.5) + "\n"
    assert render(make_report(findings), "text") == expected
    assert "gradguard: 4 findings in 12 steps (gradguard took 0.25 s of 3.50 s)" in expected


def test_json_matches_the_written_report(tmp_path):
    report = make_report(findings_in(tmp_path), command=command_for(tmp_path))
    report["detectors"]["GG301"]["shape"] = (2, 3)  # the writer's default= turns it into a list
    write_json_atomic(report, tmp_path / "out.json")
    text = render(report, "json")
    assert text == (tmp_path / "out.json").read_text(encoding="utf-8")
    assert json.loads(text)["detectors"]["GG301"]["shape"] == [2, 3]


def test_render_dispatches(tmp_path):
    report = make_report(findings_in(tmp_path), command=command_for(tmp_path))
    sarif = json.dumps(to_sarif(report, root=str(tmp_path)), indent=2) + "\n"
    assert render(report, "sarif", root=str(tmp_path)) == sarif
    assert render(report, "github", root=str(tmp_path)) == to_github(report, root=str(tmp_path))
    assert FORMATS == ("text", "json", "sarif", "github")


@pytest.mark.parametrize("fmt", ["xml", "SARIF", ""])
def test_unknown_format(fmt):
    with pytest.raises(ConfigurationError, match="Expected fmt to be one of text, json, sarif, github but got"):
        render(make_report([]), fmt)


@pytest.mark.parametrize("fmt", ["text", "sarif", "github"])
def test_malformed_report(fmt):
    with pytest.raises(ConfigurationError, match=r"report\['findings'\]\[0\]"):
        render({"findings": [{"code": "GG101"}]}, fmt)
    with pytest.raises(ConfigurationError, match="report"):
        render(["not", "a", "report"], fmt)  # type: ignore[arg-type]


def test_no_torch_import(tmp_path):
    f = Finding("GG101", "missing-zero-grad", Severity.WARNING, "m", location=Location("t.py", 3))
    (tmp_path / "r.json").write_text(json.dumps(make_report([f])), encoding="utf-8")
    code = (
        "import json, pathlib, sys\n"
        "import gradguard.formats as fm\n"
        f"report = json.loads(pathlib.Path({str(tmp_path / 'r.json')!r}).read_text())\n"
        "for fmt in fm.FORMATS:\n"
        "    fm.render(report, fmt)\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
