"""The read-only view of a run that detectors receive: models, optimizers, names, counters.

A detector never holds the guard. It reads what it needs from its :class:`Run`: the live
models and optimizers (weakly held), parameter names, which optimizer owns a parameter, the
step and iteration counters, and the per-step budget of per-parameter checks. The guard
and its sources keep the view up to date; what is derived from the models (names, owners,
the parameter list) is cached and rebuilt only when the models or optimizers change, so
reading it costs the same on a 7B model as on a toy.
"""

from __future__ import annotations

import types
import weakref
from typing import TYPE_CHECKING, Any, TypeGuard

import torch

from gradguard.errors import ConfigurationError
from gradguard.introspect.dtensor import sharded_views
from gradguard.sampling import Budget
from gradguard.schedule import Schedule

if TYPE_CHECKING:
    from gradguard.detector import Detector
    from gradguard.events import Event


_WRAPPERS = {"DistributedDataParallel": "module", "DataParallel": "module"}


def wrapped_name(module: torch.nn.Module) -> str:
    """The submodule name under which a ``torch.compile`` or data-parallel wrapper keeps the module it calls."""
    return _WRAPPERS.get(type(module).__name__, "_orig_mod")


def inner(module: torch.nn.Module) -> torch.nn.Module | None:
    """The module a ``torch.compile`` or data-parallel wrapper calls, if ``module`` is one."""
    wrapped = module._modules.get(wrapped_name(module))
    return wrapped if isinstance(wrapped, torch.nn.Module) else None


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The user's own module inside ``torch.compile`` and data-parallel wrappers.

    >>> net = torch.nn.Linear(2, 2)
    >>> unwrap(net) is net, unwrap(torch.nn.DataParallel(net)) is net
    (True, True)
    """
    for _ in range(8):
        wrapped = inner(module)
        if wrapped is None:
            break
        module = wrapped
    return module


#: Where wrappers keep the optimizer they wrap: Accelerate's and DeepSpeed's ``optimizer``, Lightning's ``_optimizer``.
_WRAPPED_OPTIMIZER = ("optimizer", "_optimizer")
_OPTIMIZER_DEPTH = 4  # wrappers around wrappers followed at most
_ACCEPTED = (
    "a torch.optim.Optimizer, or a wrapper that holds one in an attribute (Accelerate's AcceleratedOptimizer, "
    "Lightning's LightningOptimizer)"
)


def find_optimizer(obj: object) -> torch.optim.Optimizer | None:
    """The torch optimizer ``obj`` is or wraps, or ``None`` if it is neither.

    A wrapper is followed through ``optimizer`` or ``_optimizer``, or through its one
    attribute that holds an optimizer, a few wrappers deep. An optimizer subclass that
    holds another optimizer there is a wrapper too; one that torch's ``Optimizer.__init__``
    never set up (Accelerate's) is used only through the optimizer it holds. Attributes are
    read from the instance's ``__dict__``: no property or ``__getattr__`` of the object runs.

    >>> opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    >>> find_optimizer(opt) is opt, find_optimizer(torch.optim.lr_scheduler.StepLR(opt, 1)) is opt
    (True, True)
    >>> find_optimizer("adam") is None
    True
    """
    return _find_optimizer(obj, _OPTIMIZER_DEPTH, set())


def unwrap_optimizer(obj: object, arg: str = "optimizer", *, lists: bool = False) -> torch.optim.Optimizer:
    """The torch optimizer ``obj`` is or wraps (see :func:`find_optimizer`); raises for anything else.

    Raises:
        ConfigurationError: ``obj`` is no optimizer and holds none gradguard can find; the
            message names ``arg``, the type received and what is accepted (a list of them
            too, with ``lists``).

    >>> opt = torch.optim.SGD(torch.nn.Linear(2, 2).parameters(), lr=0.1)
    >>> class Wrapper:
    ...     def __init__(self, inner):
    ...         self.inner = inner
    >>> unwrap_optimizer(Wrapper(opt)) is opt
    True
    >>> unwrap_optimizer(0.1, "optimizer")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    gradguard.errors.ConfigurationError: Expected optimizer to be a torch.optim.Optimizer, or ... but got float
    """
    found = find_optimizer(obj)
    if found is not None:
        return found
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    if type(obj).__module__ == "builtins":
        kind = type(obj).__qualname__
    held = [name for name, value in _instance_attributes(obj).items() if isinstance(value, torch.optim.Optimizer)]
    if len(held) > 1:
        why = f", which holds several optimizers ({', '.join(held)}): pass the one meant, or a list of them"
    elif isinstance(obj, torch.optim.Optimizer):
        why = ", an optimizer class whose __init__ never called torch.optim.Optimizer.__init__, holding no optimizer"
    else:
        why = ""
    accepted = f"{_ACCEPTED}, or a list of them" if lists else _ACCEPTED
    raise ConfigurationError(f"Expected {arg} to be {accepted} but got {kind}{why}")


def _find_optimizer(obj: object, depth: int, seen: set[int]) -> torch.optim.Optimizer | None:
    if depth < 0 or id(obj) in seen or isinstance(obj, (type, types.ModuleType)):
        return None  # a module's globals are no wrapper's state (and reading some of them warns)
    seen.add(id(obj))
    attrs = _instance_attributes(obj)
    if _is_optimizer(obj) and "_optimizer_step_pre_hooks" in attrs:
        # a set-up optimizer: itself, unless it wraps another under a wrapper's name (its step() calls that one's)
        for name in _WRAPPED_OPTIMIZER:
            inner = attrs.get(name)
            if _is_optimizer(inner):
                found = _find_optimizer(inner, depth - 1, seen)
                if found is not None:
                    return found
        return obj
    for name in _WRAPPED_OPTIMIZER:  # DeepSpeed's engine optimizer is no torch optimizer, and wraps one
        if name in attrs:
            found = _find_optimizer(attrs[name], depth - 1, seen)
            if found is not None:
                return found
    held = {id(v): v for v in attrs.values() if _is_optimizer(v) and v is not obj}
    if len(held) == 1:
        return _find_optimizer(next(iter(held.values())), depth - 1, seen)
    return None


def _is_optimizer(obj: object) -> TypeGuard[torch.optim.Optimizer]:
    # type(), never isinstance(): isinstance reads __class__, which some objects answer with a warning
    return issubclass(type(obj), torch.optim.Optimizer)


def _instance_attributes(obj: object) -> dict[str, Any]:
    """``obj.__dict__``, read without running the object's own attribute lookup; empty if it has none."""
    try:
        attrs = object.__getattribute__(obj, "__dict__")
    except Exception:  # slots, or a broken object: nothing to follow
        return {}
    return attrs if isinstance(attrs, dict) else {}


class Counts:
    """One thread's share of the counters of a run, written by that thread alone.

    The first thread that reports to a guard counts in the :class:`Run`'s own attributes,
    and every other thread in a ``Counts`` of its own, so that no counter is ever written by
    two threads at once and none loses a count; the run's counters are their sums. The
    ``Counts`` of threads that have ended are folded into one when another thread starts, so
    there are never more than the live threads, plus one.
    """

    __slots__ = ("backwards", "forwards", "owner", "ticks")

    def __init__(self, owner: object | None = None, forwards: int = 0, backwards: int = 0, ticks: int = 0) -> None:
        self.forwards = forwards
        self.backwards = backwards
        self.ticks = ticks
        #: what the thread holds while it runs (its loop state), weakly; ``None`` once folded
        self.owner = weakref.ref(owner) if owner is not None else None

    def ended(self) -> bool:
        """Whether no thread writes these counts any longer."""
        return self.owner is None or self.owner() is None


class Run:
    """What detectors may know of the run. They read it; only the guard writes it."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.schedule = Schedule(budget)
        self._step = 0
        self._iteration = 0
        self._backwards = 0
        self._clock = 0
        self._others: tuple[Counts, ...] = ()  # the counts of the threads after the first (see Counts)
        self._models: list[weakref.ref[torch.nn.Module]] = []
        self._optimizers: list[weakref.ref[torch.optim.Optimizer]] = []
        self._optimizer_steps: dict[int, int] = {}
        self._names: dict[int, tuple[weakref.ref[torch.Tensor], str]] = {}
        self._params: list[tuple[str, torch.nn.Parameter]] | None = None
        self._param_ids: set[int] = set()
        self._module_ids: set[int] = set()
        #: tensors of a layer replaced in some module: (tensor, that module, name under it), named when found in a model
        self._left: dict[int, tuple[weakref.ref[torch.Tensor], weakref.ref[torch.nn.Module], str]] = {}
        self._owners: dict[int, weakref.ref[torch.optim.Optimizer]] = {}
        self._owners_key: tuple[int, ...] = ()
        self._owners_stamp: tuple[int, int, int] = (-1, -1, -1)
        self.structure = 0  # goes up whenever models, optimizers or their parameters change

    # ------------------------------------------------------------------ counters
    @property
    def step(self) -> int:
        """Training steps so far (optimizer steps of the furthest optimizer)."""
        return self._step

    @property
    def iteration(self) -> int:
        """Calls of a root model's forward so far, in every thread."""
        others = self._others
        return self._iteration + sum(c.forwards for c in others) if others else self._iteration

    @property
    def clock(self) -> int:
        """Iterations ended so far, however the loop marks them (see :class:`~gradguard.events.IterationEnd`)."""
        others = self._others
        return self._clock + sum(c.ticks for c in others) if others else self._clock

    @property
    def backwards(self) -> int:
        """``backward()`` calls so far, in every thread."""
        others = self._others
        return self._backwards + sum(c.backwards for c in others) if others else self._backwards

    def optimizer_steps(self, optimizer: torch.optim.Optimizer) -> int:
        """How many times ``optimizer`` stepped while watched."""
        return self._optimizer_steps.get(id(optimizer), 0)

    # ------------------------------------------------------------------ objects
    def models(self) -> list[torch.nn.Module]:
        """The live root models (unwrapped from ``torch.compile`` and DDP)."""
        return [m for m in (r() for r in self._models) if m is not None]

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The live optimizers."""
        return [o for o in (r() for r in self._optimizers) if o is not None]

    def named_parameters(self) -> list[tuple[str, torch.nn.Parameter]]:
        """Every parameter of the models, once each, with its name (cached).

        Under ``fully_shard`` (FSDP2) a parameter is the sharded one that optimizers hold, even
        while its module holds an unsharded view (between forward and backward).
        """
        if self._params is None:
            seen: set[int] = set()
            params: list[tuple[str, torch.nn.Parameter]] = []
            modules: set[int] = set()
            paths: dict[int, str] = {}
            for model in self.models():
                sharded = sharded_views(model)
                for path, module in model.named_modules():
                    modules.add(id(module))
                    if self._left:
                        paths.setdefault(id(module), path)
                for name, view in model.named_parameters(remove_duplicate=True):
                    p = sharded.get(id(view), view)
                    if id(p) not in seen:
                        seen.add(id(p))
                        params.append((name, p))
                        self._names[id(p)] = (weakref.ref(p), name)
            self._params = params
            self._param_ids = seen
            self._module_ids = modules
            if self._left:
                self._name_left(paths)
            if len(self._names) > 2 * len(params) + 1024:  # forget parameters that are gone
                self._names = {k: v for k, v in self._names.items() if v[0]() is not None}
        return self._params

    def param_name(self, param: torch.Tensor) -> str:
        """The qualified name of a parameter (``backbone.0.weight``), or a description."""
        if self._params is None:
            self.named_parameters()
        known = self._names.get(id(param))
        if known is not None and known[0]() is param:
            return known[1]  # also the old name of a parameter since replaced in its model
        for opt in self.optimizers():
            for gi, group in enumerate(opt.param_groups):
                for pi, p in enumerate(group["params"]):
                    if p is param:
                        return f"{type(opt).__name__}.param_groups[{gi}]['params'][{pi}]"
        return f"<tensor {tuple(param.shape)}>"

    def replaced(self, param: torch.Tensor) -> bool:
        """Whether ``param`` was a parameter of a watched model and is in none now (its layer was replaced).

        Known for a layer replaced while a guard is attached (its tensors are named just
        before); :meth:`param_name` gives the old name. A tensor replaced before is only
        outside the models.
        """
        if self._params is None:
            self.named_parameters()
        if id(param) in self._param_ids:
            return False
        known = self._names.get(id(param))
        return known is not None and known[0]() is param

    def owner(self, param: torch.Tensor) -> torch.optim.Optimizer | None:
        """The watched optimizer whose param groups hold ``param`` (by identity), if any."""
        stamp = (self._step, self._iteration, self._backwards)
        if stamp != self._owners_stamp:
            self._owners_stamp = stamp
            optimizers = self.optimizers()
            key = tuple(
                x for opt in optimizers for g in opt.param_groups for x in (id(opt), id(g["params"]), len(g["params"]))
            )
            if key != self._owners_key:
                self._owners_key = key
                self._owners = {
                    id(p): weakref.ref(opt) for opt in optimizers for g in opt.param_groups for p in g["params"]
                }
        ref = self._owners.get(id(param))
        return ref() if ref is not None else None

    def owns(self, module: torch.nn.Module) -> bool:
        """Whether ``module`` is one of the watched models or inside one."""
        if self._params is None:
            self.named_parameters()
        return id(module) in self._module_ids

    def listen(self, detector: Detector, event: type[Event], on: bool) -> None:
        """A detector starts or stops receiving one of its events (see :meth:`Detector.listen`)."""
        self.schedule.listen(detector, event, on)

    # ------------------------------------------------------------------ written by the guard
    def _add_counts(self, owner: object) -> Counts:
        """Counts for a thread after the first, held by ``owner`` (one caller at a time: the guard's lock)."""
        counts = Counts(owner)
        ended = [c for c in self._others if c.ended()]
        others = [c for c in self._others if not c.ended()]
        if len(ended) > 1:  # threads that are gone: one Counts for them all
            ended = [Counts(None, *(sum(getattr(c, k) for c in ended) for k in ("forwards", "backwards", "ticks")))]
        self._others = (*ended, *others, counts)  # one store: a reader sums the old tuple or the new
        return counts

    def _add_model(self, module: torch.nn.Module) -> None:
        self._models.append(weakref.ref(module, self._changed))  # a model freed: its parameters are let go
        self._changed()

    def _add_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        self._optimizers.append(weakref.ref(optimizer))
        self._changed()

    def _replacing(self, module: torch.nn.Module, name: str, old: torch.nn.Module | torch.Tensor) -> None:
        """``module.<name>`` is about to be replaced: keep the names of the tensors it held until now."""
        if isinstance(old, torch.nn.Module):
            held: list[tuple[str, torch.Tensor]] = [(f"{name}.{sub}", p) for sub, p in old.named_parameters()]
        else:
            held = [(name, old)]
        owner = weakref.ref(module)
        for sub, p in held:
            self._left[id(p)] = (weakref.ref(p), owner, sub)
        if len(self._left) > 4096:  # forget tensors and modules that are gone
            self._left = {k: v for k, v in self._left.items() if v[0]() is not None and v[1]() is not None}

    def _name_left(self, paths: dict[int, str]) -> None:
        """Name the tensors of replaced layers by the path of the module that held them, once it is in a model."""
        for key, (ref, owner, sub) in list(self._left.items()):
            param, module = ref(), owner()
            if param is None or module is None:
                del self._left[key]
            elif id(module) in paths:
                del self._left[key]
                known = self._names.get(key)
                if known is None or known[0]() is not param:
                    path = paths[id(module)]
                    self._names[key] = (ref, f"{path}.{sub}" if path else sub)

    def _changed(self, *_: Any) -> None:
        """Models or their parameters changed: derived caches are rebuilt when next read."""
        self._params = None
        self._owners_stamp = (-1, -1, -1)
        self.structure += 1

    def _clear(self) -> None:
        self._models.clear()
        self._optimizers.clear()
        self._params = None
        self._param_ids = set()
        self._module_ids = set()
        self._left.clear()
        self._owners.clear()
        self._owners_key = ()
