"""The linter on the project's own programs: the examples, the benchmarks' loops, the test scripts.

Every example whose mistake the source shows is flagged, at the line the runtime finding
points at; every correct loop stays clean.
"""

from __future__ import annotations

import pathlib

import pytest

from gradguard.lint import lint_paths
from tests.helpers import line_of

REPO = pathlib.Path(__file__).resolve().parents[2]


def _findings(*paths):
    return sorted(
        (f.location.file, f.code, f.location.line) for f in lint_paths([str(REPO / p) for p in paths]).findings
    )


def _rel(path):
    return str(REPO / path)


def test_the_buggy_example_is_flagged_where_it_keeps_the_graph():
    # examples/missing_zero_grad.py resets under `if args.fixed:`: the source has a reset in the
    # loop, so only the run can tell that it is skipped (GG101 at run time, nothing statically).
    append = line_of(
        "self.step_losses.append(loss if self.buggy else loss.detach())", _rel("examples/lightning_finetune.py")
    )
    assert [(pathlib.Path(f).name, code, line) for f, code, line in _findings("examples")] == [
        ("lightning_finetune.py", "GG201", append)
    ]


@pytest.mark.parametrize(
    "path",
    ["benchmarks/false_alarms.py", "benchmarks/overhead.py", "benchmarks/scaling.py", "gradguard",
     "tests/test_frozen_correct_loops.py", "examples/accumulation.py", "examples/memory_leak.py"],
)  # fmt: skip
def test_correct_loops_are_not_flagged(path):
    assert _findings(path) == []


def test_the_buggy_test_scripts_are_flagged_at_the_runtime_lines():
    found = [(pathlib.Path(f).name, code, line) for f, code, line in _findings("tests/scripts")]
    ddp, fsdp = _rel("tests/scripts/ddp_ranks.py"), _rel("tests/scripts/fsdp_no_zero_grad.py")
    assert found == sorted([
        ("ddp_ranks.py", "GG101", line_of("opt.step()  # <- every rank: no zero_grad()", ddp)),
        ("ddp_ranks.py", "GG101", line_of("opt.step()  # <- a child: no zero_grad()", ddp)),
        ("ddp_ranks.py", "GG201", line_of("history.append(loss)  # <- rank 1 only: every step's graph kept", ddp)),
        ("fsdp_no_zero_grad.py", "GG101", line_of("opt.step()  # no zero_grad()", fsdp)),
    ])  # fmt: skip
