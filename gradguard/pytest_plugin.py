"""The pytest plugin: run tests under a guard and fail those whose training code makes a silent mistake.

Installed with gradguard (entry point ``pytest11``, name ``gradguard``), so every pytest
session loads it; it stays off until asked for, and importing it imports no torch. To load
it by hand where entry points are not loaded (``PYTEST_DISABLE_PLUGIN_AUTOLOAD``), pass
``-p gradguard`` (the entry point's name, which works whether or not it is already loaded).

**Turning it on.**

- ``pytest --gradguard`` (or ``gradguard = true`` in the ini file; ``--no-gradguard`` turns
  it off again) runs every test's call phase under a process-wide guard,
  ``gradguard.install(policy="collect")``, removed (``gradguard.uninstall()``) as soon as
  the test function returns or raises.
- ``--gradguard-select CODES`` / ``--gradguard-ignore CODES`` (ini ``gradguard_select``,
  ``gradguard_ignore``) take comma-separated code prefixes or rule names, as
  ``install(select=..., ignore=...)`` does.
- ``@pytest.mark.gradguard(...)`` turns it on for one test (or a class, or a module through
  ``pytestmark``), without the flag. Its keyword arguments, all optional:

  - ``select``, ``ignore``: code prefixes or rule names for this test; they replace the
    command line's and the ini file's;
  - ``expect``: codes or rule names this test must produce: the test fails if one is not
    found, and the findings it names never fail it;
  - ``enabled=False``: no guard and no check for this test, even under ``--gradguard``
    (for a test that installs a guard itself).

  The closest marker wins, keyword by keyword (a method's over its class's).
- The ``gradguard_guard`` fixture gives the test a :class:`GuardFixture`: ``.guard`` is the
  :class:`~gradguard.Guard` watching the test (installed when the fixture is set up, with
  the collect policy, flag or not), ``.findings`` what it found so far, and
  ``.expect("GG101")`` declares an expected finding from inside the test, like the
  marker's ``expect``.

**The rule.** A guarded test fails when its run produced a finding of severity warning or
error that it did not expect, or when an expected code was not found. The failure report
names each finding (``file:line: code name [severity] where: message``) and its fix.
Findings of severity info never fail a test, nor does ``GG000`` (gradguard's own failure,
listed at the end of the session instead). Every finding of a guarded test is shown in a
``gradguard`` section of its report (on failure, or with ``-rA``). Under the collect policy
nothing is warned, so a suite run with ``-W error`` is unaffected.

If a guard is already installed when a test starts (by the surrounding process or by one
of the test's fixtures), the plugin leaves that test alone: it neither installs, removes
nor checks anything; ``gradguard_guard`` then gives that guard, unchecked
(``GuardFixture.checked`` is ``False``). A test whose body calls ``gradguard.install()``
itself joins the test's guard.

Example:

.. code-block:: python

    import pytest
    import torch


    def test_training_step_learns():             # run with: pytest --gradguard
        model = torch.nn.Linear(4, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(4):
            opt.zero_grad()
            model(torch.randn(8, 4)).pow(2).mean().backward()
            opt.step()


    @pytest.mark.gradguard(expect=["GG101"])     # guarded even without --gradguard
    def test_the_detector_sees_a_missing_zero_grad():
        ...


    def test_with_the_guard(gradguard_guard):
        ...                                      # train
        assert [f.code for f in gradguard_guard.findings] == []
"""

from __future__ import annotations

import dataclasses
from collections.abc import Generator, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from gradguard.findings import Finding
    from gradguard.guard import Guard

__all__ = ["GuardFixture"]

_MARKER = "gradguard"
_FIXTURE = "gradguard_guard"
_SESSION = "gradguard-session"  # the name the per-session state is registered under
_MARKER_KEYWORDS = ("enabled", "select", "ignore", "expect")
_MARKER_HELP = (
    "gradguard(enabled=True, select=None, ignore=None, expect=()): run this test under a gradguard guard "
    "(policy collect) and fail it on findings of severity warning or error; select/ignore: code prefixes or "
    "rule names for this test; expect: codes this test must produce (they do not fail it); "
    "enabled=False: no guard for this test"
)


# --------------------------------------------------------------------------- options and marker
def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("gradguard", "gradguard: catch the silent mistakes of training loops")
    group.addoption(
        "--gradguard",
        action="store_true",
        dest="gradguard",
        default=None,
        help="run each test under a gradguard guard; fail tests whose run yields a warning or error finding",
    )
    group.addoption(
        "--no-gradguard",
        action="store_false",
        dest="gradguard",
        default=None,
        help="do not guard every test, whatever the ini file says (markers and the fixture still do)",
    )
    group.addoption(
        "--gradguard-select",
        metavar="CODES",
        default=None,
        help="comma-separated code prefixes or rule names to check (all by default)",
    )
    group.addoption(
        "--gradguard-ignore",
        metavar="CODES",
        default=None,
        help="comma-separated code prefixes or rule names not to check",
    )
    parser.addini("gradguard", type="bool", default=False, help="run each test under a gradguard guard")
    parser.addini("gradguard_select", default="", help="gradguard: code prefixes or rule names to check")
    parser.addini("gradguard_ignore", default="", help="gradguard: code prefixes or rule names not to check")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", _MARKER_HELP)
    config.pluginmanager.register(_Session(config), _SESSION)


def pytest_unconfigure(config: pytest.Config) -> None:
    session = config.pluginmanager.get_plugin(_SESSION)
    if isinstance(session, _Session):
        session.close()
        config.pluginmanager.unregister(session, _SESSION)


# --------------------------------------------------------------------------- the fixture
class GuardFixture:
    """What the ``gradguard_guard`` fixture gives a test: its guard, its findings, its expectations.

    Attributes:
        guard: the :class:`~gradguard.Guard` watching the test; its findings stay readable
            after the test (and in the fixture's teardown).
    """

    def __init__(self, state: _TestState, guard: Guard) -> None:
        self._state = state
        self.guard = guard

    @property
    def findings(self) -> list[Finding]:
        """The guard's findings so far, merged by code and place."""
        return self.guard.findings

    @property
    def checked(self) -> bool:
        """Whether the plugin checks this test's findings (``False`` when a guard was already installed)."""
        return self._state.guard is self.guard

    def expect(self, *codes: str) -> None:
        """Declare findings this test must produce (codes or rule names): missing ones fail the test.

        Expected findings never fail the test, whatever their severity.
        """
        self._state.expect_codes(_expect_codes("expect", codes))

    def __repr__(self) -> str:
        codes = ", ".join(f.code for f in self.findings) or "no findings"
        return f"GuardFixture({codes}{'' if self.checked else ', unchecked'})"


@pytest.fixture
def gradguard_guard(request: pytest.FixtureRequest) -> Iterator[GuardFixture]:
    """The guard watching this test: installed now, removed when the test's call ends.

    Turns gradguard on for the test (with the collect policy) whether or not ``--gradguard``
    was given, and applies its rule when the test's call ends: a finding of severity
    warning or error fails the test unless expected (``.expect(...)`` or the marker).
    """
    session = _session(request.config)
    state = session.state(request.node)
    if state is None or not state.settings.enabled:
        pytest.fail(
            f"{_FIXTURE} is requested by a test marked @pytest.mark.gradguard(enabled=False): remove one of the two",
            pytrace=False,
        )
    guard = session.start(state)
    try:
        yield GuardFixture(state, guard)
    finally:
        session.stop(state)


# --------------------------------------------------------------------------- per test
@dataclasses.dataclass(frozen=True)
class _Settings:
    enabled: bool
    select: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    expect: tuple[str, ...] = ()


@dataclasses.dataclass
class _TestState:
    settings: _Settings
    expected: list[str] = dataclasses.field(default_factory=list)
    guard: Guard | None = None  # the guard the plugin installed for this test
    foreign: Guard | None = None  # a guard found installed when the test started: left alone
    findings: list[Finding] | None = None  # the plugin's guard's findings, once removed

    def expect_codes(self, codes: Iterable[str]) -> None:
        from gradguard.errors import ConfigurationError
        from gradguard.policy import Policy

        policy = Policy("collect", select=self.settings.select, ignore=self.settings.ignore)
        for code in codes:
            if not policy.enabled(code):
                raise ConfigurationError(
                    f"Expected expect to name codes this test checks but got {code!r}, which "
                    f"select={list(self.settings.select)} / ignore={list(self.settings.ignore)} leave out"
                )
            if code not in self.expected:
                self.expected.append(code)


class _Session:
    """The plugin's state for one pytest session: its settings and each running test's guard."""

    def __init__(self, config: pytest.Config) -> None:
        option = config.getoption("gradguard")
        self.enabled = bool(config.getini("gradguard")) if option is None else bool(option)
        self.select = _split(_option_or_ini(config, "gradguard_select"), "--gradguard-select")
        self.ignore = _split(_option_or_ini(config, "gradguard_ignore"), "--gradguard-ignore")
        if self.select or self.ignore:
            error = _policy_error(self.select, self.ignore)
            if error is not None:
                raise pytest.UsageError(f"--gradguard-select/--gradguard-ignore (or gradguard_select/ignore): {error}")
        self._states: dict[str, _TestState] = {}
        self.internal_errors: dict[str, int] = {}  # GG000 findings, as text, and in how many tests

    # ------------------------------------------------------------------ the settings of a test
    def state(self, item: pytest.Item) -> _TestState | None:
        """The test's state, made on first use; ``None`` when nothing guards the test."""
        state = self._states.get(item.nodeid)
        if state is None:
            settings = self._settings(item)
            if settings is None:
                return None
            state = _TestState(settings)
            try:
                state.expect_codes(settings.expect)
            except ValueError as exc:
                pytest.fail(f"@pytest.mark.gradguard: {exc}", pytrace=False)
            self._states[item.nodeid] = state
        return state

    def _settings(self, item: pytest.Item) -> _Settings | None:
        marks = list(item.iter_markers(_MARKER))
        uses_fixture = _FIXTURE in getattr(item, "fixturenames", ())
        if not (marks or uses_fixture or self.enabled):
            return None
        kwargs: dict[str, Any] = {}
        for mark in marks:  # the closest first
            if mark.args:
                pytest.fail(
                    f"Expected @pytest.mark.gradguard to take keyword arguments only "
                    f"({', '.join(_MARKER_KEYWORDS)}) but got {mark.args!r}",
                    pytrace=False,
                )
            for key, value in mark.kwargs.items():
                if key not in _MARKER_KEYWORDS:
                    pytest.fail(
                        f"Expected @pytest.mark.gradguard keyword arguments among "
                        f"{', '.join(_MARKER_KEYWORDS)} but got {key}={value!r}",
                        pytrace=False,
                    )
                kwargs.setdefault(key, value)
        enabled = kwargs.get("enabled", True)
        if not isinstance(enabled, bool):
            pytest.fail(
                f"Expected @pytest.mark.gradguard(enabled=...) to be True or False but got {enabled!r}", pytrace=False
            )
        if not enabled:
            return _Settings(enabled=False)
        try:
            select = _split(kwargs["select"], "select") if "select" in kwargs else self.select
            ignore = _split(kwargs["ignore"], "ignore") if "ignore" in kwargs else self.ignore
            error = _policy_error(select, ignore) if ("select" in kwargs or "ignore" in kwargs) else None
            expect = _expect_codes("expect", _split(kwargs.get("expect"), "expect"))
        except (TypeError, ValueError) as exc:
            error = str(exc)
        if error is not None:
            pytest.fail(f"@pytest.mark.gradguard: {error}", pytrace=False)
        return _Settings(enabled=True, select=select, ignore=ignore, expect=expect)

    # ------------------------------------------------------------------ the guard of a test
    def start(self, state: _TestState) -> Guard:
        """Install the test's guard, unless one is installed already (which is then left alone)."""
        if state.guard is not None:
            return state.guard
        if state.foreign is not None:
            return state.foreign
        from gradguard.install import install, installed

        current = installed()
        if current is not None:
            state.foreign = current
            return current
        state.guard = install(policy="collect", select=state.settings.select, ignore=state.settings.ignore)
        return state.guard

    def stop(self, state: _TestState) -> None:
        """Remove the test's guard, if the plugin installed it; keep its findings."""
        guard = state.guard
        if guard is None or state.findings is not None:
            return
        from gradguard.install import installed, uninstall

        try:
            if installed() is guard:
                uninstall(force=True)
            else:  # the test removed it, or replaced it by its own: that one is the test's business
                guard.detach()
        finally:
            state.findings = list(guard.findings)

    def close(self) -> None:
        for state in self._states.values():
            self.stop(state)
        self._states.clear()

    # ------------------------------------------------------------------ hooks
    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> None:
        self.state(item)  # a bad marker fails the test here, before its fixtures run

    @pytest.hookimpl(hookwrapper=True, trylast=True)
    def pytest_runtest_call(self, item: pytest.Item) -> Generator[None, Any, None]:
        state = self._states.get(item.nodeid)
        if state is None or not state.settings.enabled:
            yield
            return
        self.start(state)
        try:
            yield
        finally:
            self.stop(state)

    @pytest.hookimpl(hookwrapper=True, trylast=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
        outcome = yield
        if call.when != "call":
            return
        state = self._states.get(item.nodeid)
        if state is None or (state.findings is None and state.foreign is None):
            return
        try:
            report = outcome.get_result()
        except BaseException:  # another hook failed: nothing to add to
            return
        failure, section = self._verdict(state)
        if section:
            report.sections.append(("gradguard", section))
        if failure is not None and report.passed:
            report.outcome = "failed"
            report.longrepr = failure

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> None:
        state = self._states.get(item.nodeid)
        if state is not None:
            self.stop(state)  # the call phase never ran (a fixture failed), or was interrupted

    def pytest_runtest_logfinish(self, nodeid: str) -> None:
        state = self._states.pop(nodeid, None)
        if state is not None:
            self.stop(state)

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if self.internal_errors:
            terminalreporter.write_sep("=", "gradguard internal errors (they never fail a test)")
            for text, tests in self.internal_errors.items():
                terminalreporter.write_line(text if tests == 1 else f"{text} [in {tests} tests]")

    # ------------------------------------------------------------------ the rule
    def _verdict(self, state: _TestState) -> tuple[str | None, str]:
        """The failure message (``None`` if the test passes the rule) and the report section."""
        if state.foreign is not None:
            return None, "a guard was already installed when this test started: gradguard left the test unchecked"
        from gradguard.findings import Severity

        findings = state.findings or []
        expected = state.expected
        loud = [f for f in findings if f.severity >= Severity.WARNING and f.code != "GG000" and f.code not in expected]
        missing = [code for code in expected if not any(f.code == code for f in findings)]
        for f in findings:
            if f.code == "GG000":
                self.internal_errors[str(f)] = self.internal_errors.get(str(f), 0) + 1
        section = "\n".join(_describe(f) for f in findings)
        if expected:
            section += f"\nexpected: {', '.join(expected)}"
        if not (loud or missing):
            return None, section.strip()
        lines: list[str] = []
        if loud:
            lines.append(f"gradguard found {_plural(len(loud), 'problem')} in this test:")
            lines.extend(_describe(f, indent="  ") for f in loud)
        for code in missing:
            lines.append(f"gradguard expected {code} ({_rule_name(code)}) from this test, but it was not found")
        if missing:
            seen = ", ".join(f.code for f in findings) or "none"
            lines.append(f"  findings seen: {seen}")
        if loud:
            codes = sorted({f.code for f in loud})
            lines.append(f"If intended, mark the test @pytest.mark.gradguard(expect={codes!r}).")
        return "\n".join(lines), section.strip()


# --------------------------------------------------------------------------- helpers
def _session(config: pytest.Config) -> _Session:
    session = config.pluginmanager.get_plugin(_SESSION)
    if not isinstance(session, _Session):
        raise RuntimeError("the gradguard pytest plugin is not configured in this session")
    return session


def _option_or_ini(config: pytest.Config, name: str) -> str:
    value = config.getoption(name)
    return str(config.getini(name)) if value is None else str(value)


def _split(value: Any, arg: str) -> tuple[str, ...]:
    """Comma-separated text, or an iterable of such texts, as a tuple of stripped parts."""
    if value is None:
        return ()
    parts: list[Any] | None = (
        [value] if isinstance(value, str) else list(value) if isinstance(value, Iterable) else None
    )
    if parts is None or not all(isinstance(part, str) for part in parts):
        raise TypeError(f"Expected {arg} to be a string or a list of strings but got {value!r}")
    out: list[str] = []
    for part in parts:
        out.extend(p.strip() for p in part.split(",") if p.strip())
    return tuple(out)


def _policy_error(select: tuple[str, ...], ignore: tuple[str, ...]) -> str | None:
    """What is wrong with ``select`` and ``ignore``, or ``None``."""
    from gradguard.errors import ConfigurationError
    from gradguard.policy import Policy

    try:
        Policy("collect", select=select, ignore=ignore)
    except ConfigurationError as exc:
        return str(exc)
    return None


def _expect_codes(arg: str, codes: Iterable[str]) -> tuple[str, ...]:
    from gradguard.errors import ConfigurationError
    from gradguard.rules import RULES, resolve

    out: list[str] = []
    for text in codes:
        code = resolve(text) if isinstance(text, str) else None
        if code is None:
            known = ", ".join(f"{c} ({n})" for c, n in RULES.items())
            raise ConfigurationError(
                f"Expected {arg} to hold finding codes or rule names but got {text!r}; known: {known}"
            )
        out.append(code)
    return tuple(out)


def _rule_name(code: str) -> str:
    from gradguard.rules import RULES

    return RULES.get(code, "?")


def _describe(finding: Finding, indent: str = "") -> str:
    text = f"{indent}{finding}"
    if finding.hint:
        text += f"\n{indent}    fix: {finding.hint}"
    return text


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"
