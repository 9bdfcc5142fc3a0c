"""Start-up time of the quick commands: ``--help``, ``--version``, ``rules``, ``explain``.

Each command runs as a fresh process, in rounds whose order is shuffled, next to a bare
``python -c pass`` so that the interpreter's own start-up is known. The figure is the
median wall time of each command over the rounds, and what it adds to a bare interpreter.
It fails (exit 1) when a command's median passes ``--limit`` seconds (0.3 by default), or
when a quick command imports torch.

    python benchmarks/cli_startup.py
    python benchmarks/cli_startup.py --rounds 20 --json cli.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time

COMMANDS = {
    "--help": ["--help"],
    "--version": ["--version"],
    "rules": ["rules"],
    "explain GG201": ["explain", "GG201"],
    "run --help": ["run", "--help"],
}


def command_line(args: list[str]) -> list[str]:
    """The installed ``gradguard`` next to this Python, or ``python -m gradguard``."""
    script = shutil.which("gradguard", path=os.path.dirname(sys.executable))
    return [script, *args] if script else [sys.executable, "-m", "gradguard", *args]


def timed(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - start


def imports_torch(args: list[str]) -> bool:
    code = (
        "import sys\nfrom gradguard.cli import main\n"
        f"try:\n    main({args!r})\nexcept SystemExit:\n    pass\n"
        "sys.stdout.flush()\nsys.__stderr__.write(str('torch' in sys.modules))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    return proc.stderr.strip().endswith("True")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--limit", type=float, default=0.3, help="seconds a quick command may take")
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    ns = parser.parse_args()

    runs = {name: command_line(args) for name, args in COMMANDS.items()}
    runs["python -c pass"] = [sys.executable, "-c", "pass"]
    times: dict[str, list[float]] = {name: [] for name in runs}
    for argv in runs.values():  # one unmeasured run each: the page cache warm
        timed(argv)
    for _ in range(ns.rounds):
        order = list(runs)
        random.shuffle(order)
        for name in order:
            times[name].append(timed(runs[name]))

    bare = statistics.median(times["python -c pass"])
    print(f"{'command':<18} {'median s':>9} {'p90 s':>7} {'over python':>12} {'torch?':>7}")
    results = {}
    failed = False
    for name, samples in times.items():
        median = statistics.median(samples)
        p90 = sorted(samples)[int(0.9 * (len(samples) - 1))]
        torch_loaded = imports_torch(COMMANDS[name]) if name in COMMANDS else False
        slow = name in COMMANDS and median > ns.limit
        failed |= slow or torch_loaded
        flag = "  <- over the limit" if slow else ""
        print(f"{name:<18} {median:>9.3f} {p90:>7.3f} {median - bare:>12.3f} {torch_loaded!s:>7}{flag}")
        results[name] = {"median_s": median, "p90_s": p90, "over_python_s": median - bare, "torch": torch_loaded}
    print(f"\nlimit {ns.limit:.2f} s; {ns.rounds} rounds; python {sys.version.split()[0]}")
    if ns.json:
        with open(ns.json, "w", encoding="utf-8") as fh:
            json.dump({"limit_s": ns.limit, "rounds": ns.rounds, "results": results}, fh, indent=2)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
