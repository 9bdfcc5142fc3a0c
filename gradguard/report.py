"""The run report: JSON data, and a readable text summary."""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
import tempfile
from collections import Counter
from typing import Any

import torch

from gradguard._version import __version__
from gradguard.findings import Finding, Severity

REPORT_VERSION = 1


def environment() -> dict[str, Any]:
    """Versions and devices of the running process."""
    cuda = torch.cuda.is_available()
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda": cuda,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    }
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        env["numpy"] = getattr(numpy, "__version__", "")
    return env


def build_report(
    *,
    findings: list[Finding],
    steps: int,
    iterations: int,
    overhead_s: float,
    wall_s: float,
    detectors: list[str],
    detector_data: dict[str, Any],
) -> dict[str, Any]:
    by_severity = Counter(f.severity.value for f in findings)
    return {
        "version": REPORT_VERSION,
        "gradguard": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "summary": {
            "steps": steps,
            "iterations": iterations,
            "findings": len(findings),
            "by_severity": {s.value: by_severity.get(s.value, 0) for s in Severity},
            "overhead_s": round(overhead_s, 6),
            "wall_s": round(wall_s, 6),
            "detectors": detectors,
        },
        "environment": environment(),
        "findings": [f.to_dict() for f in findings],
        "detectors": detector_data,
    }


def write_json_atomic(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write JSON to ``path`` through a temporary file, so readers never see half a file."""
    write_text_atomic(json.dumps(report, indent=2, default=_json_default) + "\n", path)


def write_text_atomic(text: str, path: str | os.PathLike[str]) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename it."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".gradguard-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return repr(value)


def format_summary(findings: list[Finding], *, steps: int, overhead_s: float, wall_s: float) -> str:
    """A readable summary of a run's findings, for a terminal.

    >>> from gradguard.findings import Finding, Location, Severity
    >>> f = Finding("GG101", "missing-zero-grad", Severity.WARNING, "applied twice",
    ...             hint="Call zero_grad()", location=Location("t.py", 9), where="w")
    >>> print(format_summary([f], steps=3, overhead_s=0.01, wall_s=1.0))
    gradguard: 1 finding in 3 steps (gradguard took 0.01 s of 1.00 s)
    <BLANKLINE>
      t.py:9: GG101 missing-zero-grad [warning] w: applied twice
          fix: Call zero_grad()
    """
    noun = "finding" if len(findings) == 1 else "findings"
    head = f"gradguard: {len(findings)} {noun} in {steps} steps (gradguard took {overhead_s:.2f} s of {wall_s:.2f} s)"
    if not findings:
        return head
    lines = [head, ""]
    order = sorted(findings, key=lambda f: (-f.severity.rank, f.code))
    for f in order:
        lines.append(f"  {f}")
        if f.hint:
            lines.append(f"      fix: {f.hint}")
    return "\n".join(lines)
