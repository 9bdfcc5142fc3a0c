import os
import sys

import pytest
import torch

# Two cores on CI: keep torch from oversubscribing them across test processes.
torch.set_num_threads(1)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def run_cli(tmp_path):
    """Run ``python -m gradguard ARGS`` in a subprocess; return the completed process."""
    import subprocess

    def run(*args: str, cwd=None, timeout: float = 120):
        env = dict(os.environ)
        env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
        env.setdefault("OMP_NUM_THREADS", "1")
        return subprocess.run(
            [sys.executable, "-m", "gradguard", *args],
            cwd=cwd or tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run


@pytest.fixture
def write_script(tmp_path):
    """Write a script file under tmp_path and return its path."""
    import textwrap

    def write(source: str, name: str = "train.py"):
        path = tmp_path / name
        path.write_text(textwrap.dedent(source))
        return path

    return write
