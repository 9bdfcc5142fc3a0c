"""The run report: JSON data, and a readable text summary."""

from __future__ import annotations

import datetime
import json
import os
import platform
import stat
import sys
import tempfile
from collections import Counter
from typing import Any

from gradguard import ranks
from gradguard._version import __version__
from gradguard.errors import ConfigurationError
from gradguard.findings import Finding, Severity

REPORT_VERSION = 1


def environment() -> dict[str, Any]:
    """Versions and devices of the running process."""
    import torch

    cuda = torch.cuda.is_available()
    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cuda": cuda,
        # named only where CUDA is set up already: naming device 0 would set up a context on it
        "device": _cuda_name(torch) if cuda else "cpu",
    }
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        env["numpy"] = getattr(numpy, "__version__", "")
    return env


def command_record(argv: list[str] | None = None, *, module: str | None = None) -> dict[str, Any]:
    """How the process was started: its arguments, script or module, folder and interpreter.

    >>> command_record(["train.py", "--lr", "3"])["argv"]
    ['train.py', '--lr', '3']
    """
    argv = list(sys.argv if argv is None else argv)
    if module is None:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        module = getattr(spec, "name", None)
    script = None
    if module is None and argv and os.path.isfile(argv[0]):
        script = os.path.abspath(argv[0])
    return {"argv": argv, "script": script, "module": module, "cwd": os.getcwd(), "python": sys.executable}


def _cuda_name(torch: Any) -> str:
    if not torch.cuda.is_initialized():
        return "cuda"
    return str(torch.cuda.get_device_name(torch.cuda.current_device()))


def build_report(
    *,
    findings: list[Finding],
    steps: int,
    iterations: int,
    overhead_s: float,
    wall_s: float,
    detectors: list[str],
    detector_data: dict[str, Any],
    suppressed: list[Finding] | None = None,
    command: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON report (``version`` :data:`REPORT_VERSION`); :func:`load_report` reads it back.

    Each finding lists the ranks that saw it (this process's, read now: see
    :func:`gradguard.ranks.current`), and ``summary.world_size`` the size of the run.
    """
    by_severity = Counter(f.severity.value for f in findings)
    hidden = list(suppressed or ())
    rank = ranks.current()
    report = {
        "version": REPORT_VERSION,
        "gradguard": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else command_record(),
        "summary": {
            "steps": steps,
            "iterations": iterations,
            "findings": len(findings),
            "by_severity": {s.value: by_severity.get(s.value, 0) for s in Severity},
            "suppressed": len(hidden),
            "overhead_s": round(overhead_s, 6),
            "wall_s": round(wall_s, 6),
            "detectors": detectors,
        },
        "environment": environment(),
        "findings": [f.to_dict() for f in findings],
        "suppressed": [f.to_dict() for f in hidden],
        "detectors": detector_data,
    }
    return ranks.annotate(report, rank=rank.rank, world_size=rank.world_size)


def load_report(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check a JSON report; bad input raises :class:`ConfigurationError` in one line.

    The report must be an object with a ``version`` this gradguard reads, a ``summary``
    object and a ``findings`` list whose entries are findings.
    """
    try:
        with open(path, encoding="utf-8") as fh:
            report = json.load(fh)
    except OSError as exc:
        raise ConfigurationError(f"cannot read report {os.fspath(path)}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigurationError(f"{os.fspath(path)} is not JSON: {exc}") from None
    check_report(report, str(os.fspath(path)))
    return report


def check_report(report: Any, name: str = "report") -> None:
    """Raise :class:`ConfigurationError` unless ``report`` has the shape of a gradguard report.

    >>> check_report({"version": 1, "summary": {}, "findings": []})
    >>> check_report({"a": 1}, "r.json")
    Traceback (most recent call last):
    ...
    gradguard.errors.ConfigurationError: r.json is not a gradguard report: expected a "version" key
    >>> check_report({"version": 99, "summary": {}, "findings": []}, "r.json")
    Traceback (most recent call last):
    ...
    gradguard.errors.ConfigurationError: r.json is a version 99 report; this gradguard (...) reads version 1
    """

    def bad(why: str) -> ConfigurationError:
        return ConfigurationError(f"{name} is not a gradguard report: {why}")

    if not isinstance(report, dict):
        raise bad(f"expected a JSON object but got {type(report).__name__}")
    if "version" not in report:
        raise bad('expected a "version" key')
    version = report["version"]
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise bad(f"expected an integer version but got {version!r}")
    if version > REPORT_VERSION:
        raise ConfigurationError(
            f"{name} is a version {version} report; this gradguard ({__version__}) reads version {REPORT_VERSION}"
        )
    if not isinstance(report.get("summary"), dict):
        raise bad('expected a "summary" object')
    findings = report.get("findings")
    if not isinstance(findings, list):
        raise bad('expected a "findings" list')
    for i, item in enumerate(findings):
        try:
            Finding.from_dict(item)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            why = f"missing key {exc}" if isinstance(exc, KeyError) else str(exc)
            raise bad(f"findings[{i}] is not a finding ({why})") from None
        seen = item.get("ranks", [])
        if not isinstance(seen, list) or not all(_is_int(r) and r >= 0 for r in seen):
            raise bad(f"findings[{i}].ranks must be a list of ranks (integers from 0) but got {seen!r}")
    for key in ("steps", "overhead_s", "wall_s"):
        value = report["summary"].get(key, 0)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise bad(f"summary.{key} must be a number but got {value!r}")
    world = report["summary"].get("world_size", 1)
    if not _is_int(world) or world < 1:
        raise bad(f"summary.world_size must be a positive integer but got {world!r}")
    if not isinstance(report.get("parts", []), list):
        raise bad(f'expected "parts" to be a list but got {type(report["parts"]).__name__}')


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def write_json_atomic(report: dict[str, Any], path: str | os.PathLike[str]) -> None:
    """Write JSON to ``path`` through a temporary file, so readers never see half a file."""
    write_text_atomic(json.dumps(report, indent=2, default=_json_default) + "\n", path)


def write_text_atomic(text: str, path: str | os.PathLike[str], *, newline: str | None = None) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same folder, then rename it.

    The file gets the mode a plain ``open(path, "w")`` would give it: that of the file it
    replaces, or ``0o666`` less the umask. ``newline`` is :func:`open`'s (``""``: the text's
    own line endings, untranslated).
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        mode = 0o666 & ~current_umask()
    fd, tmp = tempfile.mkstemp(prefix=".gradguard-", suffix=os.path.splitext(path)[1], dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline=newline) as fh:
            fh.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # no way to read it but to set it: put it back at once
    os.umask(mask)
    return mask


def _json_default(value: Any) -> Any:
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    return repr(value)


def format_summary(
    findings: list[Finding],
    *,
    steps: int,
    overhead_s: float,
    wall_s: float,
    suppressed: int = 0,
    world_size: int = 1,
    ranks_seen: list[list[int]] | None = None,
) -> str:
    """A readable summary of a run's findings, for a terminal.

    In a run of several ranks (``world_size``), each finding says which ranks saw it
    (``ranks_seen``, one list per finding).

    >>> from gradguard.findings import Finding, Location, Severity
    >>> f = Finding("GG101", "missing-zero-grad", Severity.WARNING, "applied twice",
    ...             hint="Call zero_grad()", location=Location("t.py", 9), where="w")
    >>> print(format_summary([f], steps=3, overhead_s=0.01, wall_s=1.0))
    gradguard: 1 finding in 3 steps (gradguard took 0.01 s of 1.00 s)
    <BLANKLINE>
      t.py:9: GG101 missing-zero-grad [warning] w: applied twice
          fix: Call zero_grad()
    >>> print(format_summary([f], steps=3, overhead_s=0.01, wall_s=1.0, world_size=2, ranks_seen=[[0, 1]]))
    gradguard: 1 finding in 3 steps on 2 ranks (gradguard took 0.01 s of 1.00 s)
    <BLANKLINE>
      t.py:9: GG101 missing-zero-grad [warning] w: applied twice, on ranks 0, 1
          fix: Call zero_grad()
    """
    noun = "finding" if len(findings) == 1 else "findings"
    hidden = f", {suppressed} suppressed by comments" if suppressed else ""
    on = f" on {world_size} ranks" if world_size > 1 else ""
    head = (
        f"gradguard: {len(findings)} {noun} in {steps} steps{on}{hidden} "
        f"(gradguard took {overhead_s:.2f} s of {wall_s:.2f} s)"
    )
    if not findings:
        return head
    lines = [head, ""]
    order = sorted(range(len(findings)), key=lambda i: (-findings[i].severity.rank, findings[i].code))
    for i in order:
        f = findings[i]
        seen = ranks_seen[i] if ranks_seen is not None and i < len(ranks_seen) else []
        lines.append(f"  {f}, on {ranks.describe(seen)}" if world_size > 1 and seen else f"  {f}")
        if f.hint:
            lines.append(f"      fix: {f.hint}")
    return "\n".join(lines)
