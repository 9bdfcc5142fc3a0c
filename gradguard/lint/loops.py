"""Training loops as the source shows them: ``backward()`` calls, optimizer steps, gradient resets.

GG101 (a loop that steps with no reset) and GG102 (a reset between ``backward()`` and
``step()``) ask the same questions of the same code. An *optimizer* is a name that looks
like one (``optimizer``, ``opt_d``, ``self.optim``) or that the file binds to an optimizer
class; a call of a function defined in the same file counts for what its body does,
transitively (a ``train_step()`` that calls ``optimizer.zero_grad()`` resets).

Example:
    >>> index = Index(Source("t.py", "def clear(m):\\n    m.zero_grad()\\nopt = torch.optim.SGD(ps)\\n"))
    >>> index.reaches(ast.parse("clear(net)").body[0].value, "reset"), sorted(index.optimizers)
    (True, ['opt'])
"""

from __future__ import annotations

import ast
import dataclasses

from gradguard.lint.source import Source
from gradguard.lint.syntax import assigned_names, dotted, method, walk, walk_scope

_OPTIMIZER_CLASSES = frozenset(
    {"SGD", "Adam", "AdamW", "Adagrad", "Adadelta", "Adamax", "ASGD", "LBFGS", "NAdam", "RAdam", "RMSprop",
     "Rprop", "SparseAdam", "Adafactor", "Lion", "Lamb", "LAMB", "FusedAdam", "FusedLAMB", "AdamW8bit",
     "Adam8bit", "Shampoo", "Muon", "ZeroRedundancyOptimizer"}
)  # fmt: skip
#: Methods of ``self`` that a Lightning or torch base class defines and that never reset gradients.
_KNOWN_SELF = frozenset(
    {"parameters", "named_parameters", "modules", "named_modules", "children", "buffers", "train", "eval",
     "forward", "log", "log_dict", "print", "optimizers", "lr_schedulers", "manual_backward", "to",
     "state_dict", "toggle_optimizer", "untoggle_optimizer", "clip_gradients", "all_gather"}
)  # fmt: skip
_UPDATES = frozenset({"sub_", "add_", "addcdiv_", "addcmul_", "copy_"})
_KINDS = ("reset", "backward", "step")
_BACKWARDS = ("backward", "manual_backward")


def _last(node: ast.AST | None) -> str:
    """The last identifier of a name: ``opt`` for ``self.opt``, ``optimizers`` for ``self.optimizers()[0]``."""
    while isinstance(node, (ast.Subscript, ast.Call)):
        node = node.value if isinstance(node, ast.Subscript) else node.func
    if isinstance(node, ast.Attribute):
        return node.attr
    return node.id if isinstance(node, ast.Name) else ""


def _through_grad(node: ast.AST | None) -> bool:
    """Whether an attribute, subscript or call chain passes through ``.grad`` (``p.grad.data[0]``)."""
    while isinstance(node, (ast.Attribute, ast.Subscript, ast.Call)):
        if isinstance(node, ast.Attribute) and node.attr == "grad":
            return True
        node = node.func if isinstance(node, ast.Call) else node.value
    return False


def _zero(node: ast.AST) -> bool:
    return isinstance(node, ast.Constant) and type(node.value) in (int, float) and node.value == 0


def _targets(node: ast.AST) -> list[ast.AST]:
    """The targets a statement writes, tuples unpacked."""
    if isinstance(node, (ast.Assign, ast.Delete)):
        raw = list(node.targets)
    elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
        raw = [node.target]
    else:
        return []
    return [e for t in raw for e in (t.elts if isinstance(t, (ast.Tuple, ast.List)) else [t])]


def is_backward(node: ast.AST) -> bool:
    """Whether ``node`` is a call that computes gradients: ``loss.backward()``, ``accelerator.backward(loss)``.

    >>> [is_backward(ast.parse(s).body[0].value) for s in ("scaler.scale(loss).backward()", "backward(x)")]
    [True, False]
    """
    return isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _BACKWARDS


def is_reset(node: ast.AST) -> bool:
    """Whether ``node`` (a call or a statement) may reset gradients: ``zero_grad()``, ``p.grad = None``...

    Generous on purpose: what may reset keeps GG101 silent.

    >>> [is_reset(ast.parse(s).body[0]) for s in ("p.grad = None", "del p.grad", "p.grad *= 2")]
    [True, True, False]
    >>> [is_reset(ast.parse(s).body[0].value) for s in ("p.grad.data.zero_()", "zero_grads(m)", "p.grad.clamp_(0)")]
    [True, True, False]
    """
    if isinstance(node, ast.Call):
        name = (method(node) or "").lower()
        if "grad" in name and any(word in name for word in ("zero", "reset", "clear")):
            return True
        inner = node.func.value if isinstance(node.func, ast.Attribute) else None
        if name in ("zero_", "zeros_"):
            return _through_grad(inner) or any(_through_grad(a) for a in node.args[:1])
        return name in ("fill_", "mul_") and len(node.args) == 1 and _zero(node.args[0]) and _through_grad(inner)
    if isinstance(node, ast.AugAssign):
        return isinstance(node.op, ast.Mult) and _zero(node.value) and _through_grad(node.target)
    return any(_through_grad(t) for t in _targets(node))


def writes_grad(node: ast.AST) -> bool:
    """Whether ``node`` writes into a gradient: ``p.grad = g``, ``p.grad.copy_(g)``, ``p.grad += g``.

    >>> [writes_grad(ast.parse(s).body[0]) for s in ("p.grad = g", "x = p.grad")]
    [True, False]
    """
    if isinstance(node, ast.Call):
        name = method(node) or ""
        return name.endswith("_") and isinstance(node.func, ast.Attribute) and _through_grad(node.func.value)
    return any(_through_grad(t) for t in _targets(node))


def manual_update(node: ast.AST) -> str | None:
    """The parameter a statement updates in place with its own gradient, if it does.

    >>> [manual_update(ast.parse(s).body[0]) for s in ("w.data.sub_(lr * w.grad.data)", "w -= lr * w.grad")]
    ['w', 'w']
    >>> [manual_update(ast.parse(s).body[0]) for s in ("w -= lr * v.grad", "w = w - lr * w.grad")]
    [None, None]
    """
    if isinstance(node, ast.Expr) and method(node.value) in _UPDATES and isinstance(node.value, ast.Call):
        call = node.value
        target: ast.AST = call.func.value  # type: ignore[attr-defined]
        values = [*call.args, *(k.value for k in call.keywords)]
    elif isinstance(node, ast.AugAssign) and isinstance(node.op, (ast.Add, ast.Sub)):
        target, values = node.target, [node.value]
    elif isinstance(node, ast.Assign) and [getattr(t, "attr", None) for t in node.targets] == ["data"]:
        target, values = node.targets[0], [node.value]
    else:
        return None
    while isinstance(target, ast.Attribute) and target.attr == "data":
        target = target.value
    name = dotted(target)
    reads = any(
        isinstance(n, ast.Attribute) and n.attr == "grad" and dotted(n.value) == name
        for value in values
        for n in walk(value)
    )
    return name if name is not None and reads else None


@dataclasses.dataclass(frozen=True)
class Step:
    """An optimizer step: the call, the optimizer's name, and the closure passed to it, if any.

    >>> step = Index(Source("t.py", "")).step(ast.parse("scaler.step(self.opt)").body[0].value)
    >>> step.optimizer, step.closure
    ('self.opt', None)
    """

    call: ast.Call
    optimizer: str
    closure: ast.expr | None


class Index:
    """What one file defines that its training loops call: functions by name, optimizers, scalers, classes.

    >>> index = Index(Source("t.py", "class T:\\n    def reset(self):\\n        self.model.zero_grad()\\n"))
    >>> index.reaches(ast.parse("self.reset()").body[0].value, "reset"), sorted(index.defs)
    (True, ['reset'])
    """

    def __init__(self, source: Source) -> None:
        self.source = source
        self.defs: dict[str, list[ast.AST]] = {}
        self.optimizers: dict[str, list[ast.AST]] = {}  # the constructor call, or the loop over optimizers
        self.scalers: set[str] = set()
        self.classes: set[str] = set()
        self.attributes: set[str] = set()  # the X of every ``self.X = ...``
        for node in walk(source.tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                self.defs.setdefault(node.name, []).append(node)
            elif isinstance(node, ast.ClassDef):
                self.classes.add(node.name)
            elif isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    self._bind(target, node.value)
            elif isinstance(node, (ast.For, ast.AsyncFor)) and "optim" in source.segment(node.iter).lower():
                for name in assigned_names(node.target):
                    self.optimizers.setdefault(name, []).append(node)
        self._reach = self._reaches()

    @classmethod
    def of(cls, source: Source) -> Index:
        """The index of ``source``, built once for all the rules that ask."""
        index = source.shared.get(cls)
        if not isinstance(index, Index):
            index = source.shared[cls] = cls(source)
        return index

    def _bind(self, target: ast.AST, value: ast.AST) -> None:
        if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == "self":
            self.attributes.add(target.attr)
        name = dotted(target)
        if name is None:
            return
        if isinstance(value, ast.Lambda):
            self.defs.setdefault(name.rsplit(".", 1)[-1], []).append(value)
        elif isinstance(value, ast.Call):
            called = dotted(value.func) or ""
            last = called.rsplit(".", 1)[-1]
            if last == "GradScaler":
                self.scalers.add(name)
            elif (
                last in _OPTIMIZER_CLASSES
                or (called.startswith(("torch.optim.", "optim.")) and "lr_scheduler" not in called)
                or ("optim" in last.lower() and "sched" not in last.lower())
            ) and "swa" not in called:
                self.optimizers.setdefault(name, []).append(value)

    def _reaches(self) -> dict[str, set[str]]:
        """For each kind, the names of this file's functions that do it, themselves or through others."""
        does: dict[str, set[str]] = {kind: set() for kind in _KINDS}
        callers: dict[str | None, set[str]] = {}
        for name, fns in self.defs.items():
            for node in (n for fn in fns for n in walk_scope(fn) if isinstance(n, (ast.stmt, ast.Call))):
                kinds = (is_reset(node), is_backward(node), self.step(node) is not None)
                for kind, done in zip(_KINDS, kinds, strict=True):
                    if done:
                        does[kind].add(name)
                if isinstance(node, ast.Call):
                    callers.setdefault(method(node), set()).add(name)
        for marked in does.values():
            todo = list(marked)
            while todo:  # each name is queued once, so recursion ends
                for caller in callers.get(todo.pop(), set()) - marked:
                    marked.add(caller)
                    todo.append(caller)
        return does

    def built(self, name: str, at: ast.AST) -> list[ast.AST]:
        """What binds the optimizer ``name`` where ``at`` uses it: its calls in scope (any for ``self.x``)."""
        found = self.optimizers.get(name, [])
        if name.startswith("self."):
            return found
        scopes = [self.source.scope_of(at), *self.source.ancestors(at)]
        return [node for node in found if any(self.source.scope_of(node) is scope for scope in scopes)]

    def reaches(self, node: ast.AST, kind: str) -> bool:
        """Whether ``node`` calls a function of this file that resets, calls ``backward()`` or steps (``kind``)."""
        return isinstance(node, ast.Call) and method(node) in self._reach[kind]

    def optimizer_like(self, node: ast.AST) -> bool:
        """Whether ``node`` names an optimizer: bound to one in the file, or named like one (not a scheduler)."""
        if ast.unparse(node) in self.optimizers:
            return True
        last = _last(node).lower()
        return ("opt" in last or last in ("sgd", "adam", "adamw", "lbfgs")) and not any(
            word in last for word in ("sched", "scaler")
        )

    def step(self, node: ast.AST) -> Step | None:
        """The optimizer step ``node`` is: ``opt.step()``, ``opt.step(closure)``, ``scaler.step(opt)``."""
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute) or node.func.attr != "step":
            return None
        owner = node.func.value
        keywords = {k.arg: k.value for k in node.keywords}
        if "scaler" in _last(owner).lower() or ast.unparse(owner) in self.scalers:
            target = node.args[0] if node.args else keywords.get("optimizer")
            return None if target is None else Step(node, ast.unparse(target), None)
        if not self.optimizer_like(owner):
            return None
        closure = node.args[0] if node.args else keywords.get("closure")
        if isinstance(closure, ast.Constant) and closure.value is None:
            closure = None
        return Step(node, ast.unparse(owner), closure)

    def closure(self, expr: ast.AST) -> list[ast.AST] | None:
        """The functions a ``step(closure)`` argument names, nearest scope first; ``None``: not in this file."""
        if isinstance(expr, ast.Call) and method(expr) == "partial" and expr.args:
            expr = expr.args[0]
        if isinstance(expr, ast.Lambda):
            return [expr]
        name = dotted(expr)
        fns = self.defs.get(name.rsplit(".", 1)[-1], []) if name else []
        scopes = [self.source.scope_of(expr), *self.source.ancestors(expr)]
        visible = [fn for scope in scopes for fn in fns if self.source.scope_of(fn) is scope]
        return visible[:1] or fns or None

    def unknown_self_call(self, node: ast.AST) -> bool:
        """Whether ``node`` calls ``self.m()`` or ``super().m()`` that a base class defined elsewhere may define."""
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            return False
        owner, name = node.func.value, node.func.attr
        if isinstance(owner, ast.Name) and owner.id == "self":
            if name in self.defs or name in self.attributes or name in _KNOWN_SELF:
                return False
        elif method(owner) != "super":
            return False
        cls = next((a for a in self.source.ancestors(node) if isinstance(a, ast.ClassDef)), None)
        return cls is not None and any(_last(base) not in self.classes | {"object"} for base in cls.bases)
