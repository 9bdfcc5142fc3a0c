"""The read-only view of a run that detectors receive: models, optimizers, names, counters.

A detector never holds the guard. It reads what it needs from its :class:`Run`: the live
models and optimizers (weakly held), parameter names, which optimizer owns a parameter, the
step and iteration counters, and the per-step budget of per-parameter checks. The guard
and its sources keep the view up to date; what is derived from the models (names, owners,
the parameter list) is cached and rebuilt only when the models or optimizers change, so
reading it costs the same on a 7B model as on a toy.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Any

import torch

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


class Run:
    """What detectors may know of the run. They read it; only the guard writes it."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.schedule = Schedule(budget)
        self._step = 0
        self._iteration = 0
        self._backwards = 0
        self._clock = 0
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
        """Calls of a root model's forward so far."""
        return self._iteration

    @property
    def clock(self) -> int:
        """Iterations ended so far, however the loop marks them (see :class:`~gradguard.events.IterationEnd`)."""
        return self._clock

    @property
    def backwards(self) -> int:
        """``backward()`` calls so far."""
        return self._backwards

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
        """Every parameter of the models, once each, with its name (cached)."""
        if self._params is None:
            seen: set[int] = set()
            params: list[tuple[str, torch.nn.Parameter]] = []
            modules: set[int] = set()
            paths: dict[int, str] = {}
            for model in self.models():
                for path, module in model.named_modules():
                    modules.add(id(module))
                    if self._left:
                        paths.setdefault(id(module), path)
                for name, p in model.named_parameters(remove_duplicate=True):
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
