"""Speed of ``gradguard lint``: files and lines per second of CPU time, on one core.

Two trees, each linted in this process several times; the figure is the best rate over the
rounds, taken with the process's CPU time (``time.process_time``: one core, whatever else
the machine does):

- ``installed``: a large tree of real PyTorch code, the sources of torch and of the
  PyTorch packages installed beside it (lightning, torchmetrics, accelerate, where present),
  about 3,000 files; or the folders given with ``--tree``;
- ``own``: the worst case, a tree where every file trains or tests training loops: the
  repository's own Python files (package, tests, benchmarks, examples), copied under a
  temporary folder until it holds ``--files`` files.

Each rule is then timed alone on the ``own`` tree. It fails (exit 1) when the rate on the
first tree is under ``--min-rate`` files per second (200 by default).

    python benchmarks/lint_speed.py
    python benchmarks/lint_speed.py --tree ~/src/myproject --rounds 5 --json lint.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

from gradguard.lint import RULES, discover, lint_file, rules
from gradguard.lint.engine import check
from gradguard.lint.source import Source

REPO = pathlib.Path(__file__).resolve().parents[1]
SOURCES = ("gradguard", "tests", "benchmarks", "examples")
INSTALLED = ("torch", "lightning", "lightning_fabric", "torchmetrics", "accelerate")


def installed_tree() -> list[str]:
    """The source folders of torch and the PyTorch packages installed beside it."""
    folders = []
    for name in INSTALLED:
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.submodule_search_locations:
            folders.extend(spec.submodule_search_locations)
    return folders


def make_tree(folder: pathlib.Path, count: int) -> list[str]:
    """``count`` Python files under ``folder``: the repository's, copied as often as needed."""
    originals = [p for p in discover([str(REPO / name) for name in SOURCES]) if p.endswith(".py")]
    made = []
    copy = 0
    while len(made) < count:
        for original in originals:
            if len(made) == count:
                break
            target = folder / f"copy{copy}" / os.path.relpath(original, REPO)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(original, target)
            made.append(str(target))
        copy += 1
    return made


def rate(files: list[str], active: list, rounds: int) -> tuple[float, float]:
    """The best CPU seconds over ``rounds`` to lint ``files``, and the findings of the last round."""
    best = float("inf")
    found = 0
    for _ in range(rounds):
        start = time.process_time()
        found = sum(len(lint_file(path, active).findings) for path in files)
        best = min(best, time.process_time() - start)
    return best, found


def per_rule(files: list[str], rounds: int) -> dict[str, float]:
    """CPU seconds each rule takes alone on the parsed files (parsing not counted)."""
    sources = []
    for path in files:
        try:
            sources.append(Source(path, pathlib.Path(path).read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError):
            continue
    costs = {}
    for rule in RULES:
        best = float("inf")
        for _ in range(rounds):
            start = time.process_time()
            for source in sources:
                if rule().relevant(source.text):
                    check(source, [rule()])
            best = min(best, time.process_time() - start)
        costs[f"{rule.code} {rule.name}"] = best
    start = time.process_time()
    for path in files:
        Source(path, pathlib.Path(path).read_text(encoding="utf-8"))
    costs["read, parse and index"] = time.process_time() - start
    return costs  # per rule, on the files it is relevant to (the others are not parsed for it)


def measure(label: str, files: list[str], rounds: int) -> dict[str, float | int | str]:
    lines = sum(pathlib.Path(p).read_text(encoding="utf-8", errors="replace").count("\n") for p in files)
    seconds, found = rate(files, rules(), rounds)
    figures: dict[str, float | int | str] = {
        "tree": label,
        "files": len(files),
        "lines": lines,
        "cpu_s": round(seconds, 4),
        "files_per_s": round(len(files) / seconds, 1),
        "lines_per_s": round(lines / seconds),
        "findings": found,
    }
    print(
        f"{label}: {len(files)} files, {lines:,} lines in {seconds:.2f} s of CPU time (best of {rounds}): "
        f"{len(files) / seconds:.0f} files/s, {lines / seconds:,.0f} lines/s on one core; {found} findings"
    )
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tree", action="append", metavar="PATH", help="lint these folders instead of torch's")
    parser.add_argument("--files", type=int, default=1000, help="files in the 'own' tree (default 1000)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; the best is kept (default 3)")
    parser.add_argument("--min-rate", type=float, default=200.0, help="files per second to pass (default 200)")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    args = parser.parse_args()
    if args.files < 1 or args.rounds < 1:
        parser.error("--files and --rounds must be positive")

    folders = args.tree or installed_tree()
    big = measure("installed" if not args.tree else "tree", discover(folders), args.rounds)
    with tempfile.TemporaryDirectory(prefix="gradguard-lint-bench-") as tmp:
        files = make_tree(pathlib.Path(tmp), args.files)
        own = measure("own", files, args.rounds)
        costs = per_rule(files, 1)
    for name, cost in costs.items():
        print(f"  {name:<36} {cost * 1e3 / len(files):7.3f} ms/file")
    if args.json:
        figures = {"trees": [big, own], "per_rule_cpu_s": costs, "python": sys.version.split()[0]}
        pathlib.Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    if float(big["files_per_s"]) < args.min_rate:
        print(f"FAIL: {big['files_per_s']} files/s is under {args.min_rate:.0f}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
