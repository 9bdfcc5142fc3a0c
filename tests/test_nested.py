"""Guards used together: install() joins the one installed, guards on one model warn once, reports kept current."""

import json
import textwrap
import warnings

import pytest
import torch
from torch import nn

import gradguard
from gradguard import FindingError, FindingWarning, Guard
from gradguard.ledger import Autosave


def _train(model, opt, steps=4):
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    for _ in range(steps):
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()  # no zero_grad(): GG101 from the second step


def _model():
    model = nn.Linear(3, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _gg101(record):
    return [w for w in record if issubclass(w.category, FindingWarning) and str(w.message).startswith("GG101")]


@pytest.fixture
def clean_install():
    yield
    if gradguard.installed() is not None:
        gradguard.uninstall(force=True)


def test_install_twice_joins_and_each_uninstall_undoes_one(clean_install):
    guard = gradguard.install(policy="collect")
    assert gradguard.install() is guard
    assert gradguard.uninstall() is guard  # the join's
    assert gradguard.installed() is guard
    assert guard.attached
    _train(*_model())
    assert [f.code for f in guard.findings] == ["GG101"]  # still watching
    assert gradguard.uninstall() is guard  # the first install's: removed
    assert gradguard.installed() is None
    assert not guard.attached
    assert "notes" not in guard.to_dict()  # install() with its defaults asked for nothing


def test_a_join_asking_for_other_options_keeps_the_guards_and_notes_it(clean_install, tmp_path):
    guard = gradguard.install(policy="collect")
    joined = gradguard.install(policy="raise", select="GG1", json_path=tmp_path / "inner.json")
    assert joined is guard
    assert guard.policy.action == "collect"
    _train(*_model())  # the collect policy stays: nothing is raised
    (note,) = guard.to_dict()["notes"]
    assert note.startswith("install(policy='raise', select=['GG1']) joined the guard already installed")
    assert "policy='collect'" in note
    gradguard.uninstall()  # the join asked for a report: written when it is undone
    assert [f["code"] for f in json.loads((tmp_path / "inner.json").read_text())["findings"]] == ["GG101"]
    assert gradguard.installed() is guard
    gradguard.install()
    assert gradguard.uninstall(force=True) is guard  # the owner removes it, joins left or not
    assert gradguard.installed() is None
    assert not guard.attached


def test_two_guards_on_one_model_warn_once_and_both_collect():
    model, opt = _model()
    with pytest.warns(FindingWarning) as record, Guard(model, opt) as a, Guard(model, opt) as b:
        _train(model, opt)
    assert len(_gg101(record)) == 1
    assert [f.code for f in a.findings] == [f.code for f in b.findings] == ["GG101"]
    assert a.findings[0].count == b.findings[0].count == 3

    # under an outer guard still attached, a warning of it is not repeated by a guard attached later...
    with Guard(model, opt) as outer:
        with pytest.warns(FindingWarning) as record:
            _train(model, opt)
        with warnings.catch_warnings(record=True) as later:
            warnings.simplefilter("always")
            with Guard(model, opt) as inner:
                _train(model, opt)
        assert _gg101(later) == []
        assert [f.code for f in inner.findings] == ["GG101"]
    assert len(_gg101(record)) == 1
    assert outer.findings[0].count > 3

    # ...but once the guards that warned are gone, another run warns again
    with pytest.warns(FindingWarning) as record, Guard(model, opt):
        _train(model, opt)
    assert len(_gg101(record)) == 1


def test_a_guard_that_raises_still_raises_what_another_warned():
    model, opt = _model()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FindingWarning)
        with Guard(model, opt), pytest.raises(FindingError), Guard(model, opt, policy="raise"):
            _train(model, opt)


def test_autosave_writes_at_powers_of_two_and_every_few_seconds_when_something_changed():
    now, written = [0.0], []
    save = Autosave(lambda: written.append(now[0]), every_s=10.0, clock=lambda: now[0])
    for step in range(1, 10):
        save.poll(step, version=0)
    assert len(written) == 4  # steps 1, 2, 4 and 8
    now[0] = 11.0
    save.poll(9, version=0)
    assert len(written) == 5  # 10 s on, step 9 is written
    now[0] = 30.0
    save.poll(9, version=0)
    assert len(written) == 5  # due, but nothing changed
    save.poll(9, version=1)
    assert len(written) == 5  # changed, but written less than 10 s ago (the last look)
    now[0] = 45.0
    save.poll(9, version=1)
    assert written[-1] == 45.0


def test_autosave_never_raises_into_training():
    def fail():
        raise OSError("disk full")

    save = Autosave(fail, every_s=10.0, clock=lambda: 0.0)
    save.poll(1, version=0)  # dropped; the next write may succeed


def test_a_guard_polls_its_autosave_at_each_step_with_the_current_counts():
    model, opt = _model()
    written = []
    with Guard(model, opt, policy="collect") as guard:
        guard.autosave = Autosave(
            lambda: written.append((guard.step, guard.findings[0].count if guard.findings else 0)),
            clock=lambda: 0.0,
        )
        _train(model, opt, steps=8)
    # the counts reach the writer on schedule: a finding seen again changes the ledger's version
    assert written == [(0, 0), (2, 1), (4, 3), (8, 7)]  # the first: the first backward(), before any step


def test_install_inside_gradguard_run_joins_its_guard(write_script, run_cli, tmp_path):
    script = write_script(
        textwrap.dedent(
            """
            import torch
            from torch import nn
            import gradguard

            guard = gradguard.install(policy="collect")
            assert guard is gradguard.installed()
            model = nn.Linear(3, 1)
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            x, y = torch.randn(4, 3), torch.randn(4, 1)
            with gradguard.Guard(model, opt) as own:  # the script's own guard too
                for _ in range(4):
                    nn.functional.mse_loss(model(x), y).backward()
                    opt.step()
            assert gradguard.uninstall() is guard and gradguard.installed() is guard
            print("own guard found", [f.code for f in own.findings])
            """
        )
    )
    proc = run_cli("run", "--json", "out.json", str(script))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "own guard found ['GG101']\n"
    assert proc.stderr.count("FindingWarning: GG101") == 1  # the run's guard and the script's: one warning
    report = json.loads((tmp_path / "out.json").read_text())
    assert [f["code"] for f in report["findings"]] == ["GG101"]
    (note,) = report["notes"]
    assert note.startswith("install(policy='collect') joined the guard already installed")
