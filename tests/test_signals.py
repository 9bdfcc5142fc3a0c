"""``gradguard run`` and signals: they end the program as they would without gradguard, after the report."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

LOOP = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    from torch import nn

    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    """
)


def _report(tmp_path):
    return json.loads((tmp_path / "out.json").read_text())


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_a_terminating_signal_ends_the_run_whatever_the_script_catches(name, write_script, run_cli, tmp_path):
    script = write_script(
        LOOP
        + textwrap.dedent(
            f"""
            for i in range(8):
                try:
                    nn.functional.mse_loss(model(x), y).backward()
                    opt.step()  # no zero_grad(): GG101 from the second step
                    if i == 3:
                        os.kill(os.getpid(), signal.{name})
                except:  # swallows everything an exception can carry
                    print("caught")
            print("ran to the end")
            """
        )
    )
    proc = run_cli("run", "--json", "out.json", str(script))
    assert proc.returncode == -getattr(signal, name), proc.stderr
    assert "caught" not in proc.stdout
    assert "ran to the end" not in proc.stdout
    assert f"gradguard: {name}: JSON report written to out.json" in proc.stderr
    report = _report(tmp_path)
    (finding,) = report["findings"]
    assert finding["code"] == "GG101"
    assert (finding["count"], report["summary"]["steps"]) == (3, 4)  # the report of the moment it ended


def test_ctrl_c_ends_the_run_as_plain_python_does(write_script, run_cli, tmp_path):
    script = write_script(
        LOOP
        + textwrap.dedent(
            """
            def interrupt():
                os.kill(os.getpid(), signal.SIGINT)

            for _ in range(4):
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
            try:
                interrupt()
            except KeyboardInterrupt:
                print("the script's own handler ran")
            interrupt()
            """
        )
    )
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    plain = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    proc = run_cli("run", "--json", "out.json", str(script))
    assert plain.returncode == -signal.SIGINT
    assert proc.returncode == plain.returncode
    assert proc.stdout == plain.stdout == "the script's own handler ran\n"
    traceback = plain.stderr  # the whole traceback, the user's frames and nothing of gradguard's
    assert traceback.startswith("Traceback (most recent call last):")
    assert "in interrupt" in traceback
    assert traceback in proc.stderr
    assert proc.stderr.count("Traceback") == 1
    assert [f["code"] for f in _report(tmp_path)["findings"]] == ["GG101"]


def test_the_scripts_own_sigterm_handler_is_kept(write_script, run_cli, tmp_path):
    # a handler that also calls the one it replaced, as Lightning's does: without gradguard
    # that was the default, which is not callable, so the run goes on
    script = write_script(
        LOOP
        + textwrap.dedent(
            """
            stop = []
            previous = signal.getsignal(signal.SIGTERM)

            def handler(signum, frame):
                stop.append(signum)
                if callable(previous):
                    previous(signum, frame)

            signal.signal(signal.SIGTERM, handler)
            for i in range(8):
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
                if i == 3:
                    os.kill(os.getpid(), signal.SIGTERM)
                if stop:
                    break
            print("stopped cleanly after", i + 1, "steps")
            """
        )
    )
    proc = run_cli("run", "--json", "out.json", str(script))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "stopped cleanly after 4 steps\n"
    assert "SIGTERM" not in proc.stderr
    assert "1 finding in 4 steps" in proc.stderr  # the report written at exit, as usual
    assert [f["code"] for f in _report(tmp_path)["findings"]] == ["GG101"]


def test_a_hard_exit_leaves_the_counts_of_the_latest_flush(write_script, run_cli, tmp_path):
    script = write_script(
        LOOP
        + textwrap.dedent(
            """
            for _ in range(8):
                nn.functional.mse_loss(model(x), y).backward()
                opt.step()
            os._exit(3)  # no clean-up at all, as SIGKILL or an out-of-memory kill
            """
        )
    )
    proc = run_cli("run", "--json", "out.json", str(script))
    assert proc.returncode == 3, proc.stderr
    report = _report(tmp_path)
    (finding,) = report["findings"]
    # written at step 8 (a power of two), not only when GG101 was first seen (count 1, step 1)
    assert (finding["count"], report["summary"]["steps"]) == (7, 8)
