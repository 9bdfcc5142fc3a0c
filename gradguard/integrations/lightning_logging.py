"""Where a Lightning run's findings are shown: the ``Trainer``'s loggers and its progress bar.

Each time the findings change (a new one, a revised one, the totals at the end of the run),
every logger gets one row of metrics holding the totals so far, and the list of findings as
text where it takes text. Rows are totals, never increments: the last row of a run is its
summary, and an unchanged row is not logged again. A warning issued while a progress bar
draws prints through the bar, on its own line.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import sys
import warnings
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TextIO

from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import Logger
from typing_extensions import override

from gradguard.errors import GradGuardWarning
from gradguard.findings import Finding, Severity
from gradguard.policy import Policy

__all__ = ["TEXT_KEY", "BarPolicy", "FindingsLog", "findings_metrics"]

#: The key of the text (a W&B table, a TensorBoard text) that lists the findings.
TEXT_KEY = "gradguard/findings"


def findings_metrics(findings: Sequence[Finding]) -> dict[str, float]:
    """The totals of a run's findings, as one row of metrics.

    ``gradguard/findings`` counts distinct findings, ``gradguard/warnings`` and
    ``gradguard/errors`` those of that severity, ``gradguard/<CODE>`` how many times each
    code was seen, and ``gradguard/memory_growth_mib_per_step`` is ``GG301``'s rate.

    >>> from gradguard.findings import Finding, Severity
    >>> f = Finding("GG101", "missing-zero-grad", Severity.WARNING, "applied twice", count=3)
    >>> findings_metrics([f])
    {'gradguard/findings': 1.0, 'gradguard/warnings': 1.0, 'gradguard/errors': 0.0, 'gradguard/GG101': 3.0}
    """
    metrics: dict[str, float] = {
        "gradguard/findings": float(len(findings)),
        "gradguard/warnings": float(sum(f.severity == Severity.WARNING for f in findings)),
        "gradguard/errors": float(sum(f.severity == Severity.ERROR for f in findings)),
    }
    for f in findings:
        metrics[f"gradguard/{f.code}"] = metrics.get(f"gradguard/{f.code}", 0.0) + f.count
        rate = f.data.get("rate_mib_per_step")
        if f.code == "GG301" and isinstance(rate, (int, float)):
            metrics["gradguard/memory_growth_mib_per_step"] = float(rate)
    return metrics


class _Sent:
    """What one logger last received, and whether it failed in this run."""

    def __init__(self) -> None:
        self.row: dict[str, float] | None = None
        self.text: tuple[str, ...] | None = None
        self.failed = False


class FindingsLog:
    """Sends the totals of the findings to loggers, each time they changed for that logger.

    Metrics go through ``logger.log_metrics(row, step=step)``. Text goes to a logger with a
    ``log_text(key, columns, data)`` method (W&B's: a table, one finding a row) or, failing
    that, to a logger whose experiment has ``add_text(tag, text, step)`` (TensorBoard's
    ``SummaryWriter`` and its subclasses). An experiment is never created to find out: a
    logger's ``experiment`` is read only when it is a plain attribute, else the one the logger
    already created is taken from ``_experiment``, where Lightning's loggers keep it.
    ``logger.save()`` follows, so that a killed run keeps the rows (``CSVLogger`` buffers).

    A logger that raises is skipped for the rest of the run; :meth:`send` returns it, with the
    exception, for the caller to report once.

    Example:
        >>> import pathlib, tempfile
        >>> from lightning.pytorch.loggers import CSVLogger
        >>> from gradguard.findings import Finding, Severity
        >>> log = FindingsLog()
        >>> f = Finding("GG101", "missing-zero-grad", Severity.WARNING, "applied twice")
        >>> with tempfile.TemporaryDirectory() as root:
        ...     logger = CSVLogger(root, name="run", version=0)
        ...     log.send([logger], [f], step=3)
        ...     log.send([logger], [f], step=4)  # the same totals: no second row
        ...     print(pathlib.Path(logger.experiment.metrics_file_path).read_text().strip())
        []
        []
        gradguard/GG101,gradguard/errors,gradguard/findings,gradguard/warnings,step
        1.0,0.0,1.0,1.0,3
    """

    def __init__(self) -> None:
        self._sent: weakref.WeakKeyDictionary[Logger, _Sent] = weakref.WeakKeyDictionary()

    def start(self) -> None:
        """A new run: loggers that failed in the last one are tried again."""
        for sent in self._sent.values():
            sent.failed = False

    def send(self, loggers: Iterable[Logger], findings: Sequence[Finding], step: int) -> list[tuple[str, Exception]]:
        """Log the totals of ``findings`` at ``step`` to each logger whose last row they differ from.

        Returns ``(what, exception)`` for each logger that failed now, ``what`` naming it.
        """
        row = findings_metrics(findings)
        lines = tuple(str(f) for f in findings)
        failed: list[tuple[str, Exception]] = []
        for logger in loggers:
            try:
                sent = self._sent.setdefault(logger, _Sent())
            except TypeError:  # a logger that cannot be weakly referenced: nothing remembered
                sent = _Sent()
            if sent.failed or (sent.row == row and sent.text == lines):
                continue
            try:
                if sent.row != row:
                    logger.log_metrics(dict(row), step=step)
                    sent.row = row
                if sent.text != lines:
                    write = _text_writer(logger)
                    if write is not None:
                        write(lines, step)
                    sent.text = lines
                logger.save()
            except Exception as exc:  # a logger must never break training
                sent.failed = True
                failed.append((f"logging to {type(logger).__name__}", exc))
        return failed


def _text_writer(logger: Logger) -> Callable[[Sequence[str], int], None] | None:
    """How ``logger`` takes the list of findings as text, or ``None`` where it takes no text."""
    log_text = getattr(logger, "log_text", None)
    if callable(log_text) and _accepts(log_text, "key", "columns", "data"):
        step_arg = "step" if _accepts(log_text, "step") else None

        def table(lines: Sequence[str], step: int) -> None:
            extra = {step_arg: step} if step_arg else {}
            log_text(key=TEXT_KEY, columns=["finding"], data=[[line] for line in lines], **extra)

        return table
    add_text = getattr(_created_experiment(logger), "add_text", None)
    if callable(add_text):

        def text(lines: Sequence[str], step: int) -> None:
            add_text(TEXT_KEY, "\n\n".join(lines) or "no findings", step)

        return text
    return None


def _created_experiment(logger: Logger) -> Any:
    """The logger's experiment if reading it creates nothing (a run, a writer, files), else ``None``."""
    try:
        held = inspect.getattr_static(logger, "experiment")
    except AttributeError:
        return None
    if hasattr(type(held), "__get__"):  # a property, which may create the experiment when first read
        return getattr(logger, "__dict__", {}).get("_experiment")
    return held


def _accepts(fn: Callable[..., Any], *names: str) -> bool:
    """Whether ``fn`` takes each of ``names`` as a keyword argument."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return True
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return all(name in params and params[name].kind in keyword for name in names)


# --------------------------------------------------------------------------- warnings
@dataclasses.dataclass(frozen=True)
class BarPolicy(Policy):
    """The callback's policy: while a progress bar draws, a warning prints through the bar.

    Python's warning machinery still decides whether and how a warning is issued (filters,
    ``error``, ``once``); only the display of one that it would print on stderr changes, from
    ``warnings.showwarning`` to the bar's ``print``, for the time the policy warns.
    """

    bar: Callable[[], ProgressBar | None] = dataclasses.field(default=lambda: None, compare=False, repr=False)

    @override
    def apply(self, new: list[Finding]) -> None:
        bar = self.bar()
        if bar is None or not _drawing(bar) or not _shown_on_stderr():
            super().apply(new)
            return
        previous = warnings.showwarning

        def show(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: TextIO | None = None,
            line: str | None = None,
        ) -> None:
            if file is not None or not issubclass(category, GradGuardWarning):
                previous(message, category, filename, lineno, file, line)
            else:
                _print_through(bar, warnings.formatwarning(message, category, filename, lineno, line))

        warnings.showwarning = show
        try:
            super().apply(new)
        finally:
            if warnings.showwarning is show:
                warnings.showwarning = previous


def _drawing(bar: ProgressBar) -> bool:
    """Whether ``bar`` draws now, so that its ``print`` shows the text."""
    if not getattr(bar, "is_enabled", True):
        return False
    if isinstance(bar, TQDMProgressBar):  # its print writes through an open bar, or not at all
        for name in ("train_progress_bar", "val_progress_bar", "test_progress_bar", "predict_progress_bar"):
            try:
                if not getattr(bar, name).disable:
                    return True
            except Exception:  # not created yet
                continue
        return False
    return True


def _shown_on_stderr() -> bool:
    """Whether a warning shown now goes to Python's own display on stderr.

    A recording ``catch_warnings(record=True)`` (pytest's, ``pytest.warns``, a program's own)
    keeps the original ``showwarning`` and replaces ``_showwarnmsg_impl`` by its list's
    ``append``; a replaced ``showwarning`` (``logging.captureWarnings``) is the program's choice.
    """
    impl = getattr(warnings, "_showwarnmsg_impl", None)
    recording = isinstance(getattr(impl, "__self__", None), list)
    return warnings.showwarning is getattr(warnings, "_showwarning_orig", None) and not recording


def _print_through(bar: ProgressBar, text: str) -> None:
    # TQDM's print and the base class's (builtin print, which Rich's live display redirects) take a file
    takes_file = isinstance(bar, TQDMProgressBar) or type(bar).print is ProgressBar.print
    try:
        bar.print(text.rstrip("\n"), **({"file": sys.stderr} if takes_file else {}))
    except Exception:  # a bar that cannot print: the warning starts on its own line
        with contextlib.suppress(Exception):
            sys.stderr.write("\n" + text)
