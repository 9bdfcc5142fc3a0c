"""The children of a ``gradguard run``: each runs under a guard of its own, and its findings reach the report.

A process started with the ``spawn`` start method (``torch.multiprocessing.spawn``, a
``multiprocessing`` process or pool, a data loader's worker) is a fresh interpreter: while
the run lasts its command line is the standard library's with :func:`spawn_main` in place
of ``multiprocessing.spawn.spawn_main``, the run's options (policy, select, ignore, budget)
first. It installs a guard with those options before the child's target runs, then runs
the child as Python would. A fork server started while the run lasts begins in
:func:`forkserver_main`, and each child it forks does the same. (Both go through
``multiprocessing.util.spawnv_passfds``, the one function that starts them on POSIX, which
the run wraps; nothing else it starts is changed.)

A forked child (the ``fork`` start method, ``os.fork()``) inherits the installed guard. Its
report holds what it saw after the fork, in a file of its own, never the parent's;
a ``multiprocessing`` one writes it when it ends.

A child writes ``r.rank<rank>.json`` beside ``--json r.json`` if it joined a process group
of its own, else ``r.child<n>.json`` (``n``: its index among the children of its parent,
or its pid); a child that watched no model (a data loader's worker) writes nothing. Its
parent merges the file when the run ends. The run's children start no watched children
of their own.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable
from typing import Any

from gradguard import processes
from gradguard.processes import Options, Session, swap

_SPAWN = "from multiprocessing.spawn import spawn_main; spawn_main("
_FORKSERVER = "from multiprocessing.forkserver import main; main("
_fork_hooked = False


def command(session: Session, args: list[str]) -> list[str]:
    """The command line of a child about to start, changed to install a guard first; others as they are.

    >>> session = Session(None, Options(json="/tmp/r.json"))  # type: ignore[arg-type]
    >>> program = "from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=5, pipe_handle=7)"
    >>> line = command(session, ["python", "-c", program, "--multiprocessing-fork"])
    >>> print(line[2].split("\\n", 1)[1])  # doctest: +ELLIPSIS
    try:
        from gradguard.children import spawn_main
    except ImportError:
        from multiprocessing.spawn import spawn_main; spawn_main(tracker_fd=5, pipe_handle=7)
    else:
        spawn_main('{"policy": "warn", ...}', tracker_fd=5, pipe_handle=7)
    >>> line[3]
    '--multiprocessing-fork'
    >>> command(session, ["python", "-c", "print(1)"])
    ['python', '-c', 'print(1)']
    """
    if "-c" not in args[:-1]:
        return args
    at = args.index("-c") + 1
    program = args[at]
    if program.startswith(_SPAWN):
        start, plain, index, rest = "spawn_main", _SPAWN, next(session.children), program[len(_SPAWN) :]
    elif program.startswith(_FORKSERVER):
        start, plain, index, rest = "forkserver_main", _FORKSERVER, None, program[len(_FORKSERVER) :]
    else:
        return args
    options = {**session.options.to_dict(), "json": session.base, "index": index}
    options.update(parent=session.id, file=session.path() or session.base)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    boot = (  # an interpreter without gradguard (multiprocessing.set_executable) starts the child plain
        f"import sys; sys.path.append({root!r})\n"
        f"try:\n    from gradguard.children import {start}\n"
        f"except ImportError:\n    {plain}{rest}\nelse:\n    {start}({json.dumps(options)!r}, {rest}"
    )
    return [*args[:at], boot, *args[at + 1 :]]


def watch_children(session: Session) -> Callable[[], None]:
    """Children started by the spawn and fork server start methods run under a guard (until undone)."""
    import multiprocessing
    from multiprocessing import util
    from multiprocessing.forkserver import _forkserver

    original = util.spawnv_passfds
    serving = getattr(_forkserver, "_forkserver_pid", None)

    def spawnv_passfds(path: Any, args: Any, passfds: Any) -> Any:
        with contextlib.suppress(Exception):
            args = command(session, list(args))
        return original(path, args, passfds)

    undo = swap(util, "spawnv_passfds", spawnv_passfds)

    def restore() -> None:
        undo()
        started = getattr(_forkserver, "_forkserver_pid", None)
        if started is not None and started != serving and not multiprocessing.active_children():
            _forkserver._stop()  # type: ignore[attr-defined]  # the run's fork server: the next one starts plain

    return restore


def watch_forks(session: Session) -> Callable[[], None]:
    """A forked child reports apart from its parent, and a ``multiprocessing`` one when it ends."""
    global _fork_hooked
    from multiprocessing import util

    if not _fork_hooked and hasattr(os, "register_at_fork"):
        os.register_at_fork(after_in_child=_after_fork)  # for good: it does nothing once the run is over
        _fork_hooked = True
    util.register_after_fork(session, _after_process_fork)  # held weakly: gone with the session
    return lambda: None


def _after_fork() -> None:
    session = processes.current()
    if session is not None and session.pid != os.getpid():
        with contextlib.suppress(Exception):
            session.forked()


def _after_process_fork(session: Session) -> None:
    """In a ``multiprocessing`` child, once its finalizers are cleared: report when it ends."""
    if session is processes.current() and session.role == "forked" and session.pid == os.getpid():
        from multiprocessing import util

        util.Finalize(None, session.finish_forked, exitpriority=100)


def spawn_main(options: str, *args: Any, **kwargs: Any) -> None:
    """A spawned child of ``gradguard run``: install a guard, run the child as Python would, report."""
    from multiprocessing import spawn

    session = _start(options)
    try:
        spawn.spawn_main(*args, **kwargs)
    finally:
        if session is not None:
            with contextlib.suppress(Exception):
                session.finish_child()


def forkserver_main(options: str, *args: Any, **kwargs: Any) -> None:
    """The fork server of ``gradguard run``: each child it forks runs under a guard of its own."""
    from multiprocessing import forkserver, spawn

    original = spawn._main

    def _main(fd: int, parent_sentinel: Any) -> Any:
        session = _start(options)
        try:
            return original(fd, parent_sentinel)
        finally:
            if session is not None:
                with contextlib.suppress(Exception):
                    session.finish_child()

    spawn._main = _main  # this process serves only the run's children
    forkserver.main(*args, **kwargs)


def _start(text: str) -> Session | None:
    """Install the child's guard and session; ``None`` (the child runs unwatched) if that fails."""
    try:
        data = json.loads(text)
        options = Options.from_dict(data)
        guard = options.install()
        index = data.get("index")
        session = Session(
            guard,
            options,
            role="spawned",
            index=index if isinstance(index, int) else None,
            parent=data.get("parent"),
            parent_file=data.get("file"),
        )
        guard.finding_callbacks.append(session.save)
        session.enter()
        return session
    except Exception:
        return None
