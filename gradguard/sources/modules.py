"""Root modules and their forward: ``ForwardPre`` and ``ForwardPost`` events.

Only the *root* modules carry a hook (a pre- and a post-forward hook each), never their
submodules, so a forward costs the same however many layers the model has. No global
forward hook is used: it would send every submodule call down torch's slow path and make
``torch.compile(module)`` warn at every call.

- **Finding the roots** (``gradguard run``): PyTorch's global *registration* hooks, which
  fire when a module gets a parameter or a submodule (construction time, never per step),
  track the modules that have parameters and no parent. Each of them carries a hook until
  it becomes somebody's child; the first call of one at the top of the stack makes it a
  watched model.
- **torch.compile**: a hook on a module that dynamo compiles is traced, so every hook
  returns at once under ``torch.compiler.is_compiling()`` and adds no graph break. The
  events then come from where the call is still eager: the ``OptimizedModule`` that
  ``torch.compile(model)`` returns (hooked when it is made, or found once when a compiled
  model shows no forward), and, for ``model.compile()``, a small wrapper around the
  compiled call, put in place when ``compile()`` returns.
- **Copies**: while a guard is attached, ``torch.nn.Module.__getstate__`` leaves
  gradguard's hooks out of the state, so ``torch.save(model)``, ``pickle`` and
  ``copy.deepcopy`` (EMA, ``AveragedModel``) carry none of them. The replicas that
  ``DataParallel`` calls in threads of its own share the module's hooks: a call of a
  module that carries gradguard's hooks without being hooked by it is part of another
  call, never a model of its own.
- **Threads**: the nesting depth is each thread's own, and the sets of roots and
  candidates change under a lock (a thread may find a model while another calls one); a
  call of a known root takes no lock.
"""

from __future__ import annotations

import gc
import sys
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
from torch.nn.modules import module as module_mod
from torch.utils.hooks import RemovableHandle

from gradguard.events import ForwardPost, ForwardPre
from gradguard.run import inner, wrapped_name
from gradguard.sources.base import Hooks, Hub, Source
from gradguard.sources.patch import Patch

#: Handle ids of every gradguard hook on a user's module, across guards.
_HOOK_IDS: set[int] = set()
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
)


def _strip_hooks(state: dict[str, Any]) -> None:
    """Leave gradguard's hooks out of a module's pickled or copied state."""
    for key in _HOOK_DICTS:
        hooks = state.get(key)
        if hooks and not _HOOK_IDS.isdisjoint(hooks):
            state[key] = OrderedDict((k, v) for k, v in hooks.items() if k not in _HOOK_IDS)


def _wrap_getstate(original: Callable[..., Any], _notify: Callable[..., None]) -> Callable[..., Any]:
    def __getstate__(self: torch.nn.Module) -> Any:
        state = original(self)
        if _HOOK_IDS and isinstance(state, dict):
            _strip_hooks(state)
        return state

    return __getstate__


_GETSTATE = Patch(torch.nn.Module, "__getstate__", _wrap_getstate)


def _wrap_compile(original: Callable[..., Any], notify: Callable[..., None]) -> Callable[..., Any]:
    def compile(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        result = original(self, *args, **kwargs)
        notify(self)
        return result

    return compile


_COMPILE = Patch(torch.nn.Module, "compile", _wrap_compile)
_is_compiling = torch.compiler.is_compiling


def _has_params(module: torch.nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _first_params(module: torch.nn.Module, n: int = 4) -> list[torch.nn.Parameter]:
    params = []
    for p in module.parameters():
        params.append(p)
        if len(params) == n:
            break
    return params


class _EagerEntry:
    """Stands in for the compiled call of a ``model.compile()``-d root, to fire its events eagerly."""

    def __init__(self, source: ModuleSource, module: torch.nn.Module, compiled: Callable[..., Any]) -> None:
        self.source = source
        self.module = weakref.ref(module)
        self.compiled = compiled

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        module = self.module()
        if module is None or not self.source.active:
            return self.compiled(*args, **kwargs)
        self.source._pre(module, args, kwargs)
        output: Any = None
        try:
            output = self.compiled(*args, **kwargs)
            return output
        finally:
            self.source._post(module, args, kwargs, output)


class ModuleSource(Source):
    """Forward events of the watched roots; with ``discover``, finds the roots itself."""

    provides = (ForwardPre, ForwardPost)
    always = True

    def __init__(self, hub: Hub, discover: bool = False) -> None:
        super().__init__(hub)
        self.discover = discover
        self.active = False
        self._local = threading.local()
        self._lock = threading.RLock()  # roots, candidates and hooks change under it (never held while calling the hub)
        self._hooks = Hooks(on_remove=lambda handle: _HOOK_IDS.discard(handle.id))
        self._roots: set[int] = set()  # hooked modules whose calls are iterations of a watched model
        self._candidates: set[int] = set()  # hooked, not yet called (discovery)
        self._children: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()  # known to have a parent
        self._entries: list[tuple[weakref.ref[torch.nn.Module], _EagerEntry]] = []
        self._global: list[RemovableHandle] = []
        self._scanned_compiled = False
        self._iterations_seen = -1

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.active = True
        _GETSTATE.subscribe(self._noop)
        _COMPILE.subscribe(self._compiled)
        self._global = [
            module_mod.register_module_module_registration_hook(self._on_child),
            module_mod.register_module_parameter_registration_hook(self._on_param),
        ]
        if self.discover:
            self._scan_existing()

    def stop(self) -> None:
        self.active = False
        for handle in self._global:
            handle.remove()
        self._global.clear()
        with self._lock:
            self._hooks.remove_all()
            for ref, entry in self._entries:
                module = ref()
                if module is not None and module.__dict__.get("_compiled_call_impl") is entry:
                    module._compiled_call_impl = entry.compiled
            self._entries.clear()
            self._roots.clear()
            self._candidates.clear()
            self._children = weakref.WeakSet()
        _GETSTATE.unsubscribe(self._noop)
        _COMPILE.unsubscribe(self._compiled)

    def _compiled(self, module: torch.nn.Module) -> None:
        """``module.compile()`` ran: a hooked module's events now come from around its compiled call."""
        with self._lock:
            if module in self._hooks:
                self._wrap_compiled_call(module)

    def _noop(self, *args: Any) -> None:
        """The getstate patch's listener: its subscription only counts the users of the patch."""

    # ------------------------------------------------------------------ roots
    def watch(self, target: torch.nn.Module) -> None:
        """Hook a root, and the modules it wraps, so that calling it makes events."""
        module: torch.nn.Module | None = target
        with self._lock:
            while module is not None:
                self._hook(module)
                self._roots.add(id(module))
                self._candidates.discard(id(module))
                self._wrap_compiled_call(module)
                module = inner(module)

    def adopt(self, optimizer: torch.optim.Optimizer) -> None:
        """Watch the roots whose parameters ``optimizer`` trains, called or not.

        A ``LightningModule`` whose ``training_step`` calls ``self.net(x)`` never runs its own
        forward, and ``self.net`` has a parent, so no call shows the root; the optimizer does.
        """
        if not self._candidates:
            return
        trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
        found = []
        with self._lock:
            for module in self._hooks.objects():
                if id(module) in self._candidates and any(id(p) in trained for p in _first_params(module)):
                    self._candidates.discard(id(module))
                    self._roots.add(id(module))
                    found.append(module)
        for module in found:
            self.hub.add_model(module)

    def refresh(self) -> None:
        """Now and then: wrap roots compiled in place since, and find compiled wrappers once."""
        with self._lock:
            for module in self._hooks.objects():
                if id(module) in self._roots:
                    self._wrap_compiled_call(module)
        iterations = self.hub.run.iteration
        if iterations == self._iterations_seen and not self._scanned_compiled:
            # steps with no forward: a watched model compiled by a wrapper made before the guard
            self._scanned_compiled = True
            for wrapper in _compiled_wrappers(self.hub.run.models()):
                self.watch(wrapper)
        self._iterations_seen = iterations

    def _hook(self, module: torch.nn.Module) -> None:
        with self._lock:  # two threads never hook one module twice
            if module in self._hooks:
                return
            pre = module.register_forward_pre_hook(self._pre, with_kwargs=True)
            post = module.register_forward_hook(self._post, with_kwargs=True, always_call=True)
            _HOOK_IDS.update((pre.id, post.id))
            self._hooks.add(module, [pre, post])
            self._wrap_compiled_call(module)

    def _wrap_compiled_call(self, module: torch.nn.Module) -> None:
        compiled = module.__dict__.get("_compiled_call_impl")
        if compiled is None or isinstance(compiled, _EagerEntry):
            return
        entry = _EagerEntry(self, module, compiled)
        module._compiled_call_impl = entry
        self._entries.append((weakref.ref(module), entry))

    # ------------------------------------------------------------------ hooks
    def _pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if _is_compiling():
            return  # traced by dynamo: the eager wrapper around the compiled call reports it
        local = self._local
        depth = getattr(local, "depth", 0)
        local.depth = depth + 1
        if depth or not self.active:
            return
        if id(module) not in self._roots and not self._found(module):
            return
        self.hub.forward_pre(module, args, kwargs)
        return

    def _post(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if _is_compiling():
            return
        local = self._local
        depth = getattr(local, "depth", 1) - 1
        local.depth = max(depth, 0)
        if depth > 0 or not self.active or id(module) not in self._roots:
            return
        self.hub.forward_post(module, args, kwargs, output)
        return

    def _found(self, module: torch.nn.Module) -> bool:
        """A module called at the top of its thread's stack for the first time: a root found by discovery.

        ``False`` for a module that is not hooked itself yet carries gradguard's hooks, those
        of the module it is a shallow copy of: the replicas ``DataParallel`` calls, each in a
        thread of its own, inside that module's call.
        """
        with self._lock:
            if id(module) in self._roots:
                return True  # found by another thread meanwhile
            if module not in self._hooks:
                return False
            self._candidates.discard(id(module))
            self._roots.add(id(module))
        self.hub.add_model(module)
        return True

    # ------------------------------------------------------------------ registration
    def _on_param(self, module: torch.nn.Module, name: str, param: Any) -> None:
        try:
            old = module._parameters.get(name)
            if old is not None and old is not param:
                self.hub.module_replacing(module, name, old)  # called before the new one is set
            self.hub.module_changed(module)
            if self.discover and param is not None:
                self._maybe_candidate(module)
        except Exception as exc:
            self.hub.source_failed(self, exc)

    def _on_child(self, parent: torch.nn.Module, name: str, child: Any) -> None:
        try:
            old = parent._modules.get(name)
            if old is not None and old is not child:
                self.hub.module_replacing(parent, name, old)  # called before the new one is set
            if not isinstance(child, torch.nn.Module):
                return
            self.hub.module_changed(parent)
            with self._lock:
                if id(child) in self._roots and name == wrapped_name(parent):
                    self._hook(parent)  # torch.compile(model) or DDP(model) of a watched model: called instead
                    self._roots.add(id(parent))
                if self.discover:
                    self._children.add(child)
                    if id(child) in self._candidates:
                        self._candidates.discard(id(child))
                        self._hooks.remove(child)
                    if _has_params(child):
                        self._maybe_candidate(parent)
        except Exception as exc:
            self.hub.source_failed(self, exc)

    def _maybe_candidate(self, module: torch.nn.Module) -> None:
        with self._lock:
            if module in self._hooks or module in self._children:
                return
            self._hook(module)
            self._candidates.add(id(module))

    def _scan_existing(self) -> None:
        """Modules made before ``install()``: those with parameters and no parent."""
        # Only built modules, read through __dict__: the heap may hold one made by __new__ and
        # never initialised (a failed unpickling), whose attribute lookups never end.
        modules = [
            obj
            for obj in gc.get_objects()
            if _is_module_type(type(obj)) and isinstance(obj.__dict__.get("_modules"), dict)
        ]
        for module in modules:
            for child in module.__dict__["_modules"].values():
                if child is not None:
                    self._children.add(child)
        for module in modules:
            try:
                if module not in self._children and _has_params(module):
                    self._maybe_candidate(module)
            except Exception:  # a module in a broken state is no one's model
                continue


_MODULE_TYPES: dict[type, bool] = {}


def _is_module_type(tp: type) -> bool:
    known = _MODULE_TYPES.get(tp)
    if known is None:
        # type(), never isinstance(): isinstance reads __class__, which some lazy objects answer with a warning
        known = _MODULE_TYPES[tp] = issubclass(tp, torch.nn.Module)
    return known


def _compiled_wrappers(modules: list[torch.nn.Module]) -> list[torch.nn.Module]:
    """``torch.compile`` wrappers (``OptimizedModule``) of these modules that already exist (one pass over gc)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    optimized = getattr(eval_frame, "OptimizedModule", None)
    if optimized is None or not modules:
        return []
    wanted = {id(m) for m in modules}
    return [
        obj
        for obj in gc.get_objects()
        if type(obj) is optimized and id(obj.__dict__.get("_modules", {}).get("_orig_mod")) in wanted
    ]
