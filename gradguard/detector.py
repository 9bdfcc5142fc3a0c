"""The base class every detector derives from.

A detector declares its metadata, the events it consumes and handlers for exactly those
events, and keeps its state in plain attributes named in ``state_fields``. Handlers
*return* findings; a detector never prints, warns or raises, never registers a torch hook
and never patches a function: the guard feeds it events, applies the policy, merges
findings and turns any exception inside a detector into one ``GG000 internal-error``.

Example:
    >>> from gradguard.events import StepEnd
    >>> class Every10(Detector):
    ...     '''GG000-style example; a real detector names a code from RULES.'''
    ...     consumes = (StepEnd,)
    ...
    ...     @on(StepEnd)
    ...     def _step(self, event):
    ...         return None
    >>> Every10.handlers()
    {<class 'gradguard.events.StepEnd'>: '_step'}
    >>> class Broken(Detector):
    ...     consumes = (StepEnd,)
    Traceback (most recent call last):
    ...
    TypeError: Broken: StepEnd is declared in consumes but has no @on(StepEnd) handler
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from gradguard.events import Event
from gradguard.findings import Finding, Location, Revision, Severity
from gradguard.rules import RULES

if TYPE_CHECKING:
    from gradguard.run import Run

#: What a handler returns: new findings (and revisions of published ones), or None.
Findings = Iterable[Finding | Revision] | None
_F = TypeVar("_F", bound=Callable[..., Any])
_HANDLES = "__gradguard_event__"


def on(event: type[Event]) -> Callable[[_F], _F]:
    """Mark a method as the detector's handler of ``event``; declare it in ``consumes`` too."""
    if not (isinstance(event, type) and issubclass(event, Event)) or event is Event:
        raise TypeError(f"Expected @on to take an Event subclass but got {event!r}")

    def mark(fn: _F) -> _F:
        setattr(fn, _HANDLES, event)
        return fn

    return mark


class Detector:
    """Base class of detectors. Subclasses set the metadata, ``consumes`` and handlers.

    The subclass's docstring is its rule page, printed by ``gradguard explain CODE``: what
    it detects, why it matters, how to fix it, and an example.
    """

    code: ClassVar[str] = ""
    name: ClassVar[str] = ""
    severity: ClassVar[Severity] = Severity.WARNING
    hint: ClassVar[str] = ""
    #: The events this detector consumes; each has exactly one ``@on`` handler.
    consumes: ClassVar[tuple[type[Event], ...]] = ()
    #: After the warm-up, the per-step events reach it for ``duty`` steps out of every ``every``.
    every: ClassVar[int] = 1
    duty: ClassVar[int] = 1
    state_fields: ClassVar[tuple[str, ...]] = ()
    #: State lists of what this run found. A resumed run starts them empty, so that it finds
    #: again what still happens; :meth:`state_dict` gives the earlier and the new together.
    fresh_fields: ClassVar[tuple[str, ...]] = ()
    _handlers: ClassVar[dict[type[Event], str]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.code and RULES.get(cls.code) != cls.name:
            raise TypeError(f"{cls.__name__}: code {cls.code!r} and name {cls.name!r} are not in RULES")
        handlers: dict[type[Event], str] = {}
        for klass in reversed(cls.__mro__):
            for attr, value in vars(klass).items():
                event = getattr(value, _HANDLES, None)
                if event is None:
                    if attr.startswith("on_") and callable(value) and klass is cls:
                        raise TypeError(
                            f"{cls.__name__}.{attr} looks like an event handler but is not declared: "
                            "mark it with @on(EventType) and list the event in consumes"
                        )
                    continue
                for known, name in list(handlers.items()):
                    if name == attr:
                        del handlers[known]  # overridden in a subclass
                if event in handlers and handlers[event] != attr:
                    raise TypeError(f"{cls.__name__}: two handlers of {event.__name__}: {handlers[event]}, {attr}")
                handlers[event] = attr
        declared = tuple(cls.consumes)
        for event in declared:
            if not (isinstance(event, type) and issubclass(event, Event)):
                raise TypeError(f"{cls.__name__}: consumes must hold Event subclasses but got {event!r}")
            if event not in handlers:
                raise TypeError(
                    f"{cls.__name__}: {event.__name__} is declared in consumes but has no @on({event.__name__}) handler"
                )
        for event, attr in handlers.items():
            if event not in declared:
                raise TypeError(f"{cls.__name__}.{attr} handles {event.__name__}, which is not declared in consumes")
        cls._handlers = handlers

    def __init__(self) -> None:
        self._run: Run | None = None
        self._grown: dict[Any, tuple[Finding, list[str]]] = {}
        self._earlier: dict[str, list[Any]] = {}  # fresh fields restored from a checkpoint

    @classmethod
    def handlers(cls) -> dict[type[Event], str]:
        """The handler method's name for each consumed event."""
        return dict(cls._handlers)

    # ----------------------------------------------------------------- lifecycle
    @property
    def run(self) -> Run:
        """The read-only view of the run this detector is attached to."""
        if self._run is None:
            raise RuntimeError(f"{type(self).__name__} is not attached to a Guard")
        return self._run

    @property
    def attached(self) -> bool:
        return self._run is not None

    def attach(self, run: Run) -> None:
        """Called by the guard. Subclasses set up in :meth:`setup`."""
        self._run = run
        self._grown = {}
        self.setup()

    def detach(self) -> None:
        """Drop every reference to the run and to user objects."""
        try:
            self.teardown()
        finally:
            self._run = None
            self._grown = {}

    def setup(self) -> None:
        """Prepare state once attached. Override as needed."""

    def teardown(self) -> None:
        """Drop every reference to user objects. Override as needed."""

    # ----------------------------------------------------------------- helpers
    def listen(self, event: type[Event], on: bool = True) -> None:
        """Start or stop receiving one of the events this detector consumes (nothing to do for now)."""
        if event not in type(self).consumes:
            raise ValueError(f"Expected an event {type(self).__name__} consumes but got {event.__name__}")
        if self._run is not None:
            self._run.listen(self, event, on)

    def finding(
        self,
        message: str,
        *,
        where: str = "",
        location: Location | None = None,
        hint: str | None = None,
        data: dict[str, Any] | None = None,
        severity: Severity | None = None,
    ) -> Finding:
        """Build a finding with this detector's code, name, severity and hint."""
        return Finding(
            code=self.code,
            name=self.name,
            severity=severity or self.severity,
            message=message,
            hint=self.hint if hint is None else hint,
            location=location,
            where=where,
            step=self._run.step if self._run is not None else 0,
            data=data or {},
        )

    def grow(self, key: Any, names: list[str], build: Callable[[list[str]], Finding]) -> Finding | Revision:
        """One finding per ``key`` that later sightings of more names add to.

        The first call publishes ``build(names)``. Sampled checks find the parameters of one
        mistake a few at a time; each later call revises that finding (message and data
        rebuilt for every name so far) instead of adding another finding.
        """
        known = self._grown.get(key)
        if known is None:
            finding = build(list(names))
            self._grown[key] = (finding, list(names))
            return finding
        first, seen = known
        seen.extend(n for n in names if n not in seen)
        rebuilt = build(list(seen))
        return Revision(first, {"message": rebuilt.message, "data": rebuilt.data})

    def report(self) -> dict[str, Any] | None:
        """Extra JSON-serialisable data for the report, under ``detectors[code]``."""
        return None

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The detector's counters, for checkpoints. Plain Python data only."""
        state = {name: copy.deepcopy(getattr(self, name)) for name in self.state_fields}
        for name in self.fresh_fields:
            earlier = self._earlier.get(name, [])
            state[name] = earlier + [x for x in state[name] if x not in earlier]
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`. The argument is not modified."""
        if not isinstance(state, dict):
            raise ValueError(f"Expected a detector state dict but got {type(state).__name__}")
        unknown = set(state) - set(self.state_fields)
        if unknown:
            raise ValueError(f"Expected state keys among {list(self.state_fields)} but got {sorted(unknown)}")
        for name in self.state_fields:
            if name in state:
                setattr(self, name, copy.deepcopy(state[name]))
        for name in self.fresh_fields:
            if name in state:
                self._earlier[name] = list(getattr(self, name))
                setattr(self, name, [])

    @classmethod
    def rule_page(cls) -> str:
        """The rule page, in Markdown: the class docstring, dedented, and what ``gradguard lint`` checks of it.

        :func:`gradguard.pages.markdown` reads the same page without importing the detector.
        """
        from gradguard.pages import static_form

        return f"{inspect.cleandoc(cls.__doc__ or '')}\n\n**Static form.** {static_form(cls.code)}"
