"""The shipped examples run, and find what they say they find."""

import json
import os
import subprocess
import sys

import pytest

from .conftest import REPO


def _run(*args, cwd):
    env = dict(os.environ, PYTHONPATH=REPO, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(("flag", "codes"), [("--buggy", ["GG201", "GG404"]), (None, [])])
def test_lightning_example(flag, codes, tmp_path):
    pytest.importorskip("lightning.pytorch")
    script = os.path.join(REPO, "examples", "lightning_finetune.py")
    proc = _run(script, *([flag] if flag else []), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "reports" / "lightning_finetune.json").read_text())
    assert sorted(f["code"] for f in report["findings"]) == codes


def test_accumulation_example_is_clean_under_gradguard_run(tmp_path):
    script = os.path.join(REPO, "examples", "accumulation.py")
    proc = _run("-m", "gradguard", "run", "--strict", "--json", "out.json", script, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "out.json").read_text())["findings"] == []
