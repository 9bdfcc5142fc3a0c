"""The pytest plugin: ``--gradguard``, its options and ini keys, the marker, the fixture, what it leaves behind."""

from __future__ import annotations

import importlib.metadata
import inspect
import os
import subprocess
import sys
import textwrap

import pytest

import gradguard
import gradguard.install
import gradguard.pytest_plugin
from gradguard.guard import active_guards

pytest_plugins = ["pytester"]

TRAIN = """
import torch
from torch import nn


def train(reset=True, steps=4):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    for _ in range(steps):
        if reset:
            opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()  # <- the step
"""
STEP_LINE = next(i for i, line in enumerate(TRAIN.strip().splitlines(), start=1) if line.endswith("# <- the step"))

BUGGY_AND_CORRECT = """
from trainloop import train


def test_buggy():
    train(reset=False)


def test_correct():
    train()
"""


def plugin_args() -> list[str]:
    """How to load the plugin: by its entry point's name once installed with one, else by module.

    ``-p gradguard.pytest_plugin`` next to the same module loaded through the entry point
    makes pytest register one module under two names, which it refuses; ``-p gradguard``
    finds the entry point (and is a no-op when it is already loaded).
    """
    for entry_point in importlib.metadata.entry_points(group="pytest11"):
        if entry_point.value == "gradguard.pytest_plugin":
            return ["-p", entry_point.name]
    return ["-p", "gradguard.pytest_plugin"]


def torch_globals() -> dict[str, object]:
    """What a guard changes in torch while installed: global hooks and patched functions."""
    import inspect

    import torch
    from torch.nn.modules import module
    from torch.optim import lr_scheduler, optimizer

    patched = [
        (torch.autograd, "backward"),
        (torch, "from_numpy"),
        (torch, "as_tensor"),
        (torch.Tensor, "numpy"),
        (torch.Tensor, "__init__"),
        (torch.nn.Module, "__getstate__"),
        (torch.nn.Module, "compile"),
        (torch.nn.Module, "zero_grad"),
        (torch.optim.Optimizer, "zero_grad"),
        (lr_scheduler.LRScheduler, "step"),
    ]
    hooks = [
        module._global_module_registration_hooks,
        module._global_parameter_registration_hooks,
        module._global_buffer_registration_hooks,
        module._global_forward_pre_hooks,
        module._global_forward_hooks,
        optimizer._global_optimizer_pre_hooks,
        optimizer._global_optimizer_post_hooks,
    ]
    return {
        "functions": [inspect.getattr_static(owner, name) for owner, name in patched],
        "hooks": [len(h) for h in hooks],
    }


@pytest.fixture(scope="module", autouse=True)
def _modules_a_guard_imports():
    """Import, once, what a guard imports on first use (torch._dynamo and the like).

    Each in-process pytest run forgets the modules first imported during it; without this,
    every run would import them again.
    """
    namespace: dict[str, object] = {}
    exec(TRAIN, namespace)
    guard = gradguard.install(policy="collect")
    try:
        namespace["train"](reset=False)  # type: ignore[operator]
    finally:
        gradguard.uninstall()
    assert [f.code for f in guard.findings] == ["GG101"]


@pytest.fixture
def inner(pytester: pytest.Pytester):
    """Run pytest in this process, with the plugin, on files written under ``pytester.path``."""
    pytester.makepyfile(trainloop=TRAIN)

    def run(*args: str) -> pytest.RunResult:
        return pytester.runpytest_inprocess(
            *plugin_args(),
            "-p",
            "no:cacheprovider",
            "-p",
            "no:hypothesispytest",  # it imports hypothesis anew in every run
            "--strict-markers",
            "-W",
            "error",
            "-W",
            "ignore::pytest.PytestAssertRewriteWarning",  # gradguard is imported already here
            *args,
        )

    yield run
    assert gradguard.installed() is None
    assert active_guards() == []


def _clean(result: pytest.RunResult) -> None:
    """A failure is a plain test failure: no internal error, no traceback into the plugin."""
    out = result.stdout.str() + result.stderr.str()
    assert "INTERNALERROR" not in out
    assert "pytest_plugin.py" not in out


# ----------------------------------------------------------------------- --gradguard


def test_flag_fails_a_buggy_training_test_and_names_the_finding(pytester, inner):
    pytester.makepyfile(test_train=BUGGY_AND_CORRECT)
    result = inner("--gradguard")
    result.assert_outcomes(failed=1, passed=1)
    report = result.reprec.matchreport("test_buggy", when="call")
    assert report.failed
    assert result.reprec.matchreport("test_correct", when="call").passed
    result.stdout.fnmatch_lines(
        [
            "*_ test_buggy _*",
            "gradguard found 1 problem in this test:",
            f"  *trainloop.py:{STEP_LINE}: GG101 missing-zero-grad [[]warning[]] opt (SGD): *(seen 3 times)",
            "      fix: Call optimizer.zero_grad() once per optimizer step*",
            "If intended, mark the test @pytest.mark.gradguard(expect=['GG101']).",
        ]
    )
    _clean(result)


def test_off_by_default_no_guard_is_installed(pytester, inner):
    pytester.makepyfile(
        test_train=BUGGY_AND_CORRECT
        + textwrap.dedent(
            """
            import gradguard
            from gradguard.guard import active_guards


            def test_nothing_installed():
                assert gradguard.installed() is None
                assert active_guards() == []
            """
        )
    )
    result = inner()
    result.assert_outcomes(passed=3)
    # nothing of gradguard's in the output, but its name among the plugins pytest lists
    assert not [line for line in result.outlines if "gradguard" in line and not line.startswith("plugins:")]


def test_info_findings_never_fail_a_test_and_are_reported(pytester, inner):
    pytester.makepyfile(
        test_info="""
        import torch
        from torch import nn

        import gradguard


        def test_accumulation_with_batchnorm():
            torch.manual_seed(0)
            model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
            opt = torch.optim.SGD(model.parameters(), lr=0.01)
            acc = gradguard.GradientAccumulator(opt, steps=2, model=model)
            x, y = torch.randn(8, 4), torch.randn(8, 1)
            for xb, yb in zip(x.split(2), y.split(2)):
                acc.backward(nn.functional.mse_loss(model(xb), yb))
        """
    )
    result = inner("--gradguard", "-rA")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["*- gradguard -*", "*GG601 accumulation-batchnorm [[]info[]]*", "    fix: *"])


@pytest.mark.parametrize(
    ("ini", "args", "fails"),
    [
        ("", ["--gradguard", "--gradguard-ignore", "GG101"], False),
        ("", ["--gradguard", "--gradguard-select", "GG4, graph-retained"], False),
        ("", ["--gradguard", "--gradguard-select", "GG1"], True),
        ("gradguard = true\ngradguard_ignore = missing-zero-grad", [], False),
        ("gradguard = true\ngradguard_select = GG4", ["--gradguard-select", "GG1"], True),
        ("gradguard = true", ["--no-gradguard"], False),
    ],
)
def test_select_ignore_options_and_ini(pytester, inner, ini, args, fails):
    if ini:
        pytester.makeini(f"[pytest]\n{ini}\n")
    pytester.makepyfile(test_train=BUGGY_AND_CORRECT)
    result = inner(*args)
    result.assert_outcomes(failed=int(fails), passed=2 - int(fails))
    if fails:
        result.stdout.fnmatch_lines(["*GG101 missing-zero-grad*"])


def test_ini_turns_it_on_for_a_project(pytester, inner):
    pytester.makeini("[pytest]\ngradguard = true\n")
    pytester.makepyfile(test_train=BUGGY_AND_CORRECT)
    result = inner()
    result.assert_outcomes(failed=1, passed=1)
    assert result.reprec.matchreport("test_buggy", when="call").failed


def test_a_bad_code_in_the_options_is_a_usage_error(pytester, inner):
    pytester.makepyfile(test_train=BUGGY_AND_CORRECT)
    result = inner("--gradguard", "--gradguard-select", "GG9x")
    assert result.ret == pytest.ExitCode.USAGE_ERROR
    result.stderr.fnmatch_lines(
        ["*--gradguard-select*Expected select to hold code prefixes or rule names but got 'GG9x'*"]
    )


# ----------------------------------------------------------------------- the marker


def test_marker_turns_it_on_for_one_test_with_select_ignore_and_expect(pytester, inner):
    pytester.makepyfile(
        test_marked="""
        import pytest
        from trainloop import train


        @pytest.mark.gradguard
        def test_marked_buggy():
            train(reset=False)


        def test_unmarked_buggy():
            train(reset=False)


        @pytest.mark.gradguard(expect="GG101")
        def test_expected():
            train(reset=False)


        @pytest.mark.gradguard(expect=["missing-zero-grad"])
        def test_expected_but_not_found():
            train()


        @pytest.mark.gradguard(ignore="GG1")
        def test_ignored():
            train(reset=False)


        @pytest.mark.gradguard(expect="GG101")
        class TestMerged:
            @pytest.mark.gradguard(ignore="GG4")
            def test_keywords_merge(self):  # expect from the class, ignore from the method
                train(reset=False)


        @pytest.mark.gradguard(ignore="GG101")
        class TestClosest:
            @pytest.mark.gradguard(ignore="GG4")
            def test_closest_wins(self):  # the method's ignore replaces the class's
                train(reset=False)
        """
    )
    result = inner()
    result.assert_outcomes(failed=3, passed=4)
    outcomes = {
        r.head_line: r.outcome for r in result.reprec.getreports("pytest_runtest_logreport") if r.when == "call"
    }
    assert outcomes == {
        "test_marked_buggy": "failed",
        "test_unmarked_buggy": "passed",
        "test_expected": "passed",
        "test_expected_but_not_found": "failed",
        "test_ignored": "passed",
        "TestMerged.test_keywords_merge": "passed",
        "TestClosest.test_closest_wins": "failed",
    }
    result.stdout.fnmatch_lines(
        [
            "*_ test_expected_but_not_found _*",
            "gradguard expected GG101 (missing-zero-grad) from this test, but it was not found",
            "  findings seen: none",
        ]
    )
    _clean(result)


def test_marker_errors_are_reported_at_setup(pytester, inner):
    pytester.makepyfile(
        test_bad="""
        import pytest


        @pytest.mark.gradguard("GG101")
        def test_positional():
            pass


        @pytest.mark.gradguard(expected="GG101")
        def test_unknown_keyword():
            pass


        @pytest.mark.gradguard(expect="GG999")
        def test_unknown_code():
            pass


        @pytest.mark.gradguard(expect="GG101", ignore="GG1")
        def test_expect_left_out():
            pass


        @pytest.mark.gradguard(enabled="no")
        def test_enabled_not_a_bool():
            pass


        @pytest.mark.gradguard(enabled=False)
        def test_fixture_with_guard_off(gradguard_guard):
            pass


        @pytest.mark.gradguard(select=3)
        def test_select_not_text():
            pass
        """
    )
    result = inner()
    result.assert_outcomes(errors=7)
    result.stdout.fnmatch_lines_random(
        [
            "*Expected @pytest.mark.gradguard to take keyword arguments only*('GG101',)*",
            "*Expected @pytest.mark.gradguard keyword arguments among enabled, select, ignore, expect but got "
            "expected='GG101'*",
            "*Expected expect to hold finding codes or rule names but got 'GG999'*",
            "*Expected expect to name codes this test checks but got 'GG101'*select=[[][]] / ignore=[[]'GG1'[]]*",
            "*Expected @pytest.mark.gradguard(enabled=...) to be True or False but got 'no'*",
            "*gradguard_guard is requested by a test marked @pytest.mark.gradguard(enabled=False)*",
            "*@pytest.mark.gradguard: Expected select to be a string or a list of strings but got 3",
        ]
    )
    _clean(result)


# ----------------------------------------------------------------------- the fixture


def test_fixture_gives_the_guard_and_applies_the_rule(pytester, inner):
    pytester.makepyfile(
        test_fixture="""
        import gradguard
        from trainloop import train


        def test_buggy(gradguard_guard):
            assert gradguard.installed() is gradguard_guard.guard
            assert gradguard_guard.checked
            train(reset=False)
            assert [f.code for f in gradguard_guard.findings] == ["GG101"]


        def test_expected(gradguard_guard):
            train(reset=False)
            gradguard_guard.expect("GG101")


        def test_expected_but_not_found(gradguard_guard):
            gradguard_guard.expect("missing-zero-grad")
            train()


        def test_correct(gradguard_guard):
            train()
            assert gradguard_guard.findings == []
        """
    )
    result = inner()
    result.assert_outcomes(failed=2, passed=2)
    assert result.reprec.matchreport("test_buggy", when="call").failed
    assert result.reprec.matchreport("test_expected", when="call").passed
    assert result.reprec.matchreport("test_expected_but_not_found", when="call").failed
    result.stdout.fnmatch_lines(["*_ test_buggy _*", "gradguard found 1 problem in this test:", "*GG101*"])
    _clean(result)


# ----------------------------------------------------------------------- what it leaves behind


def test_hooks_are_removed_after_each_test_even_when_it_raises(pytester, inner):
    before = torch_globals()
    pytester.makeconftest(inspect.getsource(torch_globals) + "\n\nBEFORE = torch_globals()\n")
    pytester.makepyfile(
        test_raises="""
        import pytest

        import gradguard
        from conftest import BEFORE, torch_globals
        from trainloop import train


        def test_raises():
            assert gradguard.installed() is not None
            assert torch_globals() != BEFORE
            train(reset=False)
            raise RuntimeError("boom")


        @pytest.mark.gradguard(enabled=False)
        def test_after_it():
            assert gradguard.installed() is None
            assert torch_globals() == BEFORE
            train(reset=False)
        """
    )
    result = inner("--gradguard")
    result.assert_outcomes(failed=1, passed=1)
    result.stdout.fnmatch_lines(["*RuntimeError: boom", "*- gradguard -*", "*GG101 missing-zero-grad*"])
    assert torch_globals() == before


def test_an_installed_guard_is_left_alone(pytester, inner):
    pytester.makeconftest(
        """
        import pytest

        import gradguard


        @pytest.fixture(autouse=True)
        def outer_guard():
            guard = gradguard.install(policy="collect")
            yield guard
            assert gradguard.uninstall() is guard
            assert [f.code for f in guard.findings] == ["GG101"]
        """
    )
    pytester.makepyfile(
        test_outer="""
        import gradguard
        from trainloop import train


        def test_buggy(outer_guard):
            assert gradguard.installed() is outer_guard
            train(reset=False)


        def test_fixture(outer_guard, gradguard_guard):
            assert gradguard_guard.guard is outer_guard
            assert not gradguard_guard.checked
            train(reset=False)
        """
    )
    result = inner("--gradguard", "-rA")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["*a guard was already installed when this test started*"])


def test_an_internal_error_never_fails_a_test_and_is_listed(pytester, inner):
    pytester.makeconftest(
        """
        import pytest

        from gradguard.sources.numpy import NumpySource


        def broken(self):
            raise RuntimeError("numpy source broke")


        @pytest.fixture(autouse=True)
        def break_a_source(monkeypatch):
            monkeypatch.setattr(NumpySource, "start", broken)
        """
    )
    pytester.makepyfile(test_train=BUGGY_AND_CORRECT)
    result = inner("--gradguard", "-k", "correct")
    result.assert_outcomes(passed=1, deselected=1)
    result.stdout.fnmatch_lines(
        ["*gradguard internal errors (they never fail a test)*", "*GG000 internal-error*numpy source broke*"]
    )


# ----------------------------------------------------------------------- loading


def test_loads_through_its_entry_point(pytester, inner, monkeypatch, tmp_path):
    dist = tmp_path / "site" / "gradguard_entry_point_check-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: gradguard-entry-point-check\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[pytest11]\ngradguard = gradguard.pytest_plugin\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    assert plugin_args() == ["-p", "gradguard"]
    pytester.makepyfile(test_train="from trainloop import train\n\n\ndef test_buggy():\n    train(reset=False)\n")

    automatic = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "--gradguard")
    automatic.assert_outcomes(failed=1)
    automatic.stdout.fnmatch_lines(["*GG101 missing-zero-grad*"])
    by_name = inner("--gradguard")  # -p gradguard with the entry point loaded
    by_name.assert_outcomes(failed=1)


def test_a_session_with_the_plugin_loaded_and_off_imports_no_torch(tmp_path):
    # Every pytest session of a project with gradguard installed loads the plugin.
    (tmp_path / "test_light.py").write_text(
        "import sys\n\n\ndef test_light(request):\n"
        "    assert request.config.pluginmanager.has_plugin('gradguard-session')\n"
        "    assert 'gradguard.pytest_plugin' in sys.modules\n"
        "    assert 'torch' not in sys.modules\n"
    )
    env = dict(os.environ, PYTEST_DISABLE_PLUGIN_AUTOLOAD="1")
    command = [sys.executable, "-m", "pytest", *plugin_args(), "-p", "no:cacheprovider", "-q"]
    proc = subprocess.run(
        [*command, "--gradguard-select", "GG1", "test_light.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed" in proc.stdout
