"""Running a user's program as ``python SCRIPT ARGS`` or ``python -m MODULE ARGS`` would.

``sys.argv``, ``sys.path[0]``, ``__name__`` and ``__file__`` are what Python itself gives
the program, and the traceback of a failure starts in the user's code. Each function
returns the program's exit code.

**Signals keep their meaning.** A signal whose default ends the process (``SIGTERM``,
``SIGHUP``) still ends it, with the same status (-15 / 143 in a shell), however the program
catches exceptions; only the default disposition is replaced, by a handler that first calls
``on_signal`` (the command line writes its report) and then restores the default and sends
the signal again. A handler the program installs itself replaces gradguard's and is kept; one
that calls gradguard's as the "previous" handler does not end the process, as the default it
stands for would not have been called. ``Ctrl-C`` raises ``KeyboardInterrupt`` through the
program as usual; out of it, the traceback is printed and the exception raised again, and
:func:`end_interrupted` ends the process as Python does (-2 / 130).

The signal handler runs between two bytecodes of the main thread, inside whatever the
program was doing, so it must take no lock that code may hold. The command line's report
is built from plain Python data (no tensor is read, no module imported that is not loaded
already) and written through the atomic writer into a new temporary file (no shared
buffer; the one lock of the temporary names' generator is taken once before the program
starts, when the report's path is checked by making a file there). The handler writes its
one line with ``os.write``, not through ``sys.stderr``, whose buffer (or a wrapper's lock)
the interrupted code may hold, and flushes nothing of the program's: its buffered output
is lost as with the default disposition. Its first act restores the default, so a second
signal ends the process at once, and whatever happens while writing, the signal is sent
again. A
forked child (a data loader's worker) inherits the handler: ``on_signal`` is called there
too, and must tell the child from the run (the command line's writer does).
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import runpy
import signal
import sys
import threading
import traceback
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType
from typing import NoReturn

#: Signals whose default ends the process and that a run's report should survive.
ENDING = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


def run_script(script: str, args: list[str], on_signal: Callable[[int], None] | None = None) -> int:
    """Run ``script`` with ``args``: ``sys.argv[0]`` is ``script`` as given, ``__file__`` absolute.

    ``on_signal(signum)`` is called when a signal of :data:`ENDING` is about to end the
    process (see the module's docstring). A ``KeyboardInterrupt`` out of the program is
    raised again, its traceback printed.
    """
    path = os.path.abspath(script)
    with _program([script, *args], os.path.dirname(path), on_signal):
        return _guarded(lambda: _exec_file(path), path)


def run_module(module: str, args: list[str], on_signal: Callable[[int], None] | None = None) -> int:
    """Run ``module`` as ``python -m``: ``sys.argv[0]`` is its file, the current folder first on the path."""
    with _program([module, *args], os.getcwd(), on_signal):
        return _guarded(lambda: runpy.run_module(module, run_name="__main__", alter_sys=True), None)


def end_interrupted(exc: KeyboardInterrupt) -> NoReturn:
    """End the process as Python ends it on an uncaught ``KeyboardInterrupt`` whose traceback is printed.

    The exception is raised again, and Python, finding it uncaught, runs the exit handlers
    and sends itself ``SIGINT`` with the default handler (status -2, 130 in a shell), as it
    does for any program. Only its printing is skipped: the traceback is shown already.
    """
    previous = sys.excepthook
    target = id(exc)

    def quiet(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
        sys.excepthook = previous
        if id(value) != target:
            previous(kind, value, tb)

    sys.excepthook = quiet
    raise exc.with_traceback(None)


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
def _program(argv: list[str], path0: str, on_signal: Callable[[int], None] | None) -> Iterator[None]:
    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = list(argv)
    sys.path.insert(0, path0)
    handler = _terminator(on_signal)
    replaced = []
    if threading.current_thread() is threading.main_thread():  # only there can handlers be set
        for signum in ENDING:
            if signal.getsignal(signum) is signal.SIG_DFL:
                signal.signal(signum, handler)
                replaced.append(signum)
    try:
        yield
    finally:
        sys.argv = saved_argv
        sys.path[:] = saved_path
        for signum in replaced:
            if signal.getsignal(signum) is handler:  # the program's own handler stays
                signal.signal(signum, signal.SIG_DFL)
        sys.stdout.flush()


def _guarded(body: Callable[[], object], script: str | None) -> int:
    try:
        body()
        return 0
    except SystemExit as exc:
        return _exit_code(exc.code)
    except KeyboardInterrupt as exc:
        _print_user_traceback(exc, script)
        raise
    except BaseException as exc:
        _print_user_traceback(exc, script)
        return 1


def _terminator(on_signal: Callable[[int], None] | None) -> Callable[[int, FrameType | None], None]:
    """The handler that stands for the default disposition: ``on_signal``, then the default."""

    def terminate(signum: int, frame: FrameType | None) -> None:
        if signal.getsignal(signum) is not terminate:
            return  # called by the program's own handler as the one it replaced: the default is not called
        signal.signal(signum, signal.SIG_DFL)  # a second signal ends the process at once
        if on_signal is not None:
            with contextlib.suppress(BaseException):  # nothing may keep the process from ending
                on_signal(signum)
        _end_by(signum)

    return terminate


def _end_by(signum: int) -> NoReturn:
    """End the process by ``signum`` with the default disposition: status ``-signum`` (``128 + signum`` in a shell)."""
    with contextlib.suppress(BaseException):
        if hasattr(signal, "pthread_sigmask"):  # unblocked here, it is delivered before kill() returns
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})
        os.kill(os.getpid(), signum)
    os._exit(128 + signum)  # only if the signal could not end the process


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
