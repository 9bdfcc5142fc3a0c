"""Running a user's program as ``python SCRIPT ARGS`` or ``python -m MODULE ARGS`` would.

``sys.argv``, ``sys.path[0]``, ``__name__`` and ``__file__`` are what Python itself gives
the program, and the traceback of a failure starts in the user's code. Each function
returns the program's exit code.
"""

from __future__ import annotations

import builtins
import io
import os
import runpy
import signal
import sys
import traceback
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType


def run_script(script: str, args: list[str]) -> int:
    """Run ``script`` with ``args``: ``sys.argv[0]`` is ``script`` as given, ``__file__`` absolute."""
    path = os.path.abspath(script)
    with _program([script, *args], os.path.dirname(path)):
        return _guarded(lambda: _exec_file(path), path)


def run_module(module: str, args: list[str]) -> int:
    """Run ``module`` as ``python -m``: ``sys.argv[0]`` is its file, the current folder first on the path."""
    with _program([module, *args], os.getcwd()):
        return _guarded(lambda: runpy.run_module(module, run_name="__main__", alter_sys=True), None)


def _exec_file(path: str) -> None:
    with io.open_code(path) as fh:
        source = fh.read()
    code = compile(source, path, "exec", dont_inherit=True)
    main = types.ModuleType("__main__")
    main.__dict__.update(__file__=path, __cached__=None, __builtins__=builtins, __package__=None, __spec__=None)
    saved = sys.modules.get("__main__")
    sys.modules["__main__"] = main
    try:
        exec(code, main.__dict__)
    finally:
        if saved is not None:
            sys.modules["__main__"] = saved


@contextmanager
def _program(argv: list[str], path0: str) -> Iterator[None]:
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = list(argv)
    sys.path.insert(0, path0)
    previous = signal.getsignal(signal.SIGTERM)
    if previous is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        yield
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
        if previous is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
        sys.stdout.flush()


def _guarded(body: Callable[[], object], script: str | None) -> int:
    try:
        body()
        return 0
    except SystemExit as exc:
        return _exit_code(exc.code)
    except KeyboardInterrupt:
        print("KeyboardInterrupt", file=sys.stderr)
        return 130
    except BaseException as exc:
        _print_user_traceback(exc, script)
        return 1


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _print_user_traceback(exc: BaseException, script: str | None) -> None:
    tb: TracebackType | None = exc.__traceback__
    here = os.path.dirname(os.path.abspath(__file__))
    while tb is not None:
        file = os.path.abspath(tb.tb_frame.f_code.co_filename)
        if file == script or (script is None and not file.startswith(here) and "runpy" not in file):
            break
        tb = tb.tb_next
    # Start at the user's own frame, as Python would; a program that never ran (a
    # SyntaxError) shows the error alone.
    traceback.print_exception(type(exc), exc, tb)
