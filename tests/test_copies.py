"""Nothing of gradguard travels with the user's objects: save, pickle, deepcopy, EMA, .to()."""

from __future__ import annotations

import copy
import io
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn

import gradguard

from .conftest import REPO
from .helpers import tiny_data, tiny_model

_HOOK_DICTS = ("_forward_pre_hooks", "_forward_hooks", "_forward_pre_hooks_with_kwargs", "_forward_hooks_with_kwargs")


def _hooks(module: nn.Module) -> list[int]:
    return [len(getattr(m, name)) for m in module.modules() for name in _HOOK_DICTS]


def _train(model, opt, steps=3):
    x, y = tiny_data()
    for _ in range(steps):
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def _guarded(mode):
    model = tiny_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    if mode == "install":
        gradguard.install(policy="collect")
        guard = None
    else:
        guard = gradguard.Guard(model, opt, policy="collect").attach()
    _train(model, opt)
    return model, opt, guard


def _release(guard):
    if guard is None:
        gradguard.uninstall()
    else:
        guard.detach()


@pytest.mark.parametrize("mode", ["Guard", "install"])
def test_a_guarded_model_saves_pickles_and_copies_without_gradguard_hooks(mode, tmp_path):
    plain = _hooks(tiny_model())
    model, opt, guard = _guarded(mode)
    try:
        assert _hooks(model) != plain  # the guard does watch it
        path = tmp_path / "model.pt"
        torch.save(model, path)  # the whole module, as pytorch/examples' word-language model does
        loaded = torch.load(path, weights_only=False)
        copied = copy.deepcopy(model)
        unpickled = pickle.loads(pickle.dumps(model))
        ema = torch.optim.swa_utils.AveragedModel(model)
        ema.update_parameters(model)
        moved = model.to(torch.float64).to(torch.float32)
        for other in (loaded, copied, unpickled, ema.module):
            assert _hooks(other) == plain
            torch.testing.assert_close(other(torch.ones(2, 4)), model(torch.ones(2, 4)))
        assert moved is model
        _train(model, opt)  # the guard still watches the original after all that
    finally:
        _release(guard)
    assert _hooks(model) == plain


def test_a_copy_made_while_guarded_never_reports_to_the_guard():
    model, _opt, guard = _guarded("Guard")
    try:
        twin = copy.deepcopy(model)
        before = guard.iteration
        twin(torch.ones(2, 4))
        assert guard.iteration == before
    finally:
        _release(guard)


def test_a_saved_model_loads_where_gradguard_is_not_installed(tmp_path):
    model, _opt, guard = _guarded("Guard")
    try:
        buffer = io.BytesIO()
        torch.save(model, buffer)
    finally:
        _release(guard)
    path = tmp_path / "model.pt"
    path.write_bytes(buffer.getvalue())
    script = (
        "import sys; sys.modules['gradguard'] = None\n"  # importing gradguard now fails
        f"import torch; m = torch.load({str(path)!r}, weights_only=False)\n"
        "print(sum(len(x._forward_pre_hooks) + len(x._forward_hooks) for x in m.modules()))\n"
    )
    env_path = REPO  # the tests' own helpers pickle by reference to torch.nn only
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=env_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "0"


SAVING_SCRIPT = """\
import copy, pickle, sys
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(8, 4), torch.randn(8, 1)
for _ in range(3):
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    torch.save(model, sys.argv[1])
copy.deepcopy(model)
pickle.dumps(model)
print("saved")
"""


def test_gradguard_run_of_a_script_that_saves_the_whole_model(write_script, run_cli, tmp_path):
    write_script(SAVING_SCRIPT)
    proc = run_cli("run", "--no-json", "train.py", str(tmp_path / "m.pt"))
    assert proc.returncode == 0, proc.stderr
    assert "saved" in proc.stdout
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    assert _hooks(loaded) == _hooks(tiny_model().__class__(*loaded.children()))
