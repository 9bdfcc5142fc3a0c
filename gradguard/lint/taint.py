"""Which values of a function carry an autograd graph, and which definitions of a variable reach a statement.

A value carries a graph when it is differentiated (``loss.backward()``, the loss ``training_step`` returns),
made by a loss or a model in a loop that calls ``backward()`` (or in ``training_step``), or computed from such
a value; ``torch.no_grad()``, ``.item()`` and ``.detach()`` end it, and what the source cannot trace carries none.

Example:
    >>> src = Source("t.py", "for x, y in data:\\n    loss = crit(net(x), y)\\n    loss.backward()\\n    s += loss\\n")
    >>> stmt = src.tree.body[0].body[2]
    >>> origin = Taint(src).origin(stmt.value, stmt)
    >>> origin.kind, origin.node.lineno
    ('backward', 3)
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Iterator

from gradguard.lint.source import Source
from gradguard.lint.syntax import LOOPS, SCOPES, calls, dotted, method, receiver, walk, walk_scope

# fmt: off
_KEEPS = frozenset({  # what these methods give keeps the graph of the tensor they are called on
    "mean", "sum", "float", "double", "half", "bfloat16", "to", "cpu", "cuda", "view", "reshape", "squeeze", "clone",
    "unsqueeze", "flatten", "contiguous", "pow", "sqrt", "exp", "log", "abs", "neg", "mul", "div", "add", "sub",
    "softmax", "log_softmax", "sigmoid", "tanh", "relu", "clamp", "norm", "prod", "square", "type_as"})
# fmt: on
_GATHERS = frozenset({"sum", "torch.stack", "torch.cat", "torch.concat", "torch.sum", "torch.mean", "torch.add"})
_PLAIN_ATTRS = frozenset({"data", "grad", "shape", "dtype", "device", "requires_grad", "is_leaf", "grad_fn", "ndim"})
_INDICES = frozenset({"max", "min", "topk", "sort", "kthvalue", "median", "mode", "argmax", "argmin"})
_WRAPPER = re.compile(r"accelerat|fabric|engine|model|accumulat|booster|^acc$|^amp$|^trainer$|^strategy$")
_MODEL = re.compile(r"(\w*_)?(model|net|network|backbone|encoder|decoder|generator|discriminator|classifier|policy"
                    r"|actor|critic|netg|netd|resnet|unet)")  # fmt: skip
_FROZEN = frozenset({"teacher", "target", "tgt", "ema", "frozen", "ref", "reference", "old", "pretrained", "swa"})
_LOSS_NAME = re.compile(r"(\w*_)?(criterion|loss_fn|loss_func|loss_function|lossfn)(_\w*)?")
_LOSS_FUNCS = frozenset({"cross_entropy", "binary_cross_entropy", "binary_cross_entropy_with_logits", "kl_div"})
_NOT_STEP = re.compile(r"log|print|gather|backward|optimizers|schedulers|toggle|clip|hyperparameters|acc|metric|f1"
                       r"|auroc|auc|precision|recall|iou|score")  # fmt: skip


@dataclasses.dataclass(frozen=True)
class Origin:
    """Why a value carries a graph: ``kind`` (``backward``, ``returned``, ``loss``, ``model``) and the node.

    >>> Origin("loss", ast.parse("crit(out, y)").body[0].value).kind
    'loss'
    """

    kind: str
    node: ast.AST


def differentiated(call: ast.Call) -> list[tuple[ast.expr, bool]]:
    """The expressions a call differentiates, each with whether it must be a scalar (no gradient given).

    >>> [(ast.unparse(e), s) for e, s in differentiated(ast.parse("accelerator.backward(loss)").body[0].value)]
    [('loss', True)]
    """
    name, args, words = method(call), call.args, {k.arg for k in call.keywords}
    if name == "backward" and isinstance(call.func, ast.Attribute):
        owner = dotted(call.func.value) or ""
        if args and (_WRAPPER.search(owner.rsplit(".", 1)[-1].lower()) or owner.endswith("autograd")):
            return [(args[0], len(args) == 1 and not words & {"gradient", "grad_tensors"})]
        return [(call.func.value, not args and "gradient" not in words)]
    if name == "manual_backward" and args:
        return [(args[0], len(args) == 1)]
    return [(args[0], False)] if dotted(call.func) in ("torch.autograd.grad", "autograd.grad") and args else []


def binds(stmt: ast.AST, name: str) -> bool:
    """Whether ``stmt`` itself (not its body) binds ``name``.

    >>> binds(ast.parse("a, self.b = f()").body[0], "self.b"), binds(ast.parse("a[b] = 1").body[0], "a")
    (True, False)
    """
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return stmt.name == name
    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
        return any((a.asname or a.name.split(".")[0]) == name for a in stmt.names)
    targets = [*getattr(stmt, "targets", [getattr(stmt, "target", None)])]
    targets += [i.optional_vars for i in getattr(stmt, "items", ())]
    while targets:
        target = targets.pop()
        if isinstance(target, (ast.Tuple, ast.List, ast.Starred)):
            targets.extend([target.value] if isinstance(target, ast.Starred) else target.elts)
        elif target is not None and dotted(target) == name:
            return True
    return False


def _root(expr: ast.expr, *, exact: bool) -> str | None:
    """The variable a differentiated expression is (through ``scaler.scale()``, and ``.mean()`` unless ``exact``)."""
    while isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute):
        if expr.func.attr not in ("scale", *(() if exact else _KEEPS)) or (expr.func.attr == "scale" and not expr.args):
            break
        expr = expr.args[0] if expr.func.attr == "scale" else expr.func.value
    return dotted(expr)


def _roots(expr: ast.AST) -> Iterator[str]:
    """Every variable whose value may flow into ``expr``, through any call's receiver and arguments too."""
    name = dotted(expr)
    if name is not None:
        yield name
    elif isinstance(expr, ast.Call):
        for part in [getattr(expr.func, "value", None), *expr.args, *(k.value for k in expr.keywords)]:
            yield from _roots(part) if part is not None else ()
    elif not isinstance(expr, (ast.Lambda, ast.Compare)):
        for child in ast.iter_child_nodes(expr):
            yield from _roots(child)


def _grad_off(expr: ast.expr) -> bool:
    name = dotted(expr.func if isinstance(expr, ast.Call) else expr) or ""
    if name.endswith("set_grad_enabled"):
        return not (isinstance(expr, ast.Call) and expr.args and getattr(expr.args[0], "value", None) is True)
    return name.rsplit(".", 1)[-1] in ("no_grad", "inference_mode")


class Taint:
    """The graph analysis of one source: which loops train, which values carry a graph, which definitions reach.

    >>> src = Source("t.py", "for x in data:\\n    with torch.no_grad():\\n        out = net(x)\\n    l.backward()\\n")
    >>> stmt = src.tree.body[0].body[0].body[0]
    >>> Taint(src).origin(stmt.value, stmt) is None
    True
    """

    def __init__(self, source: Source) -> None:
        self.source = source
        self.losses: set[str] = set()  # variables holding an nn.XxxLoss()
        self.frozen: set[str] = set()  # models frozen with requires_grad_(False): their outputs may carry no graph
        self.training: set[ast.AST] = set()  # the loops (and functions) that differentiate something
        for node in walk(source.tree):
            if isinstance(node, ast.Assign) and (dotted(getattr(node.value, "func", None)) or "").endswith("Loss"):
                self.losses.update(dotted(t) or "" for t in node.targets)
            if not isinstance(node, ast.Call):
                continue
            if method(node) == "requires_grad_" and [getattr(a, "value", None) for a in node.args] == [False]:
                self.frozen.add(receiver(node) or "")
            if differentiated(node):
                for parent in source.ancestors(node):
                    self.training.add(parent)
                    if isinstance(parent, SCOPES):
                        break

    def statement(self, node: ast.AST) -> ast.stmt:
        """The statement that holds ``node``."""
        while not isinstance(node, ast.stmt):
            node = self.source.parent(node)  # type: ignore[assignment]
        return node

    def loop_of(self, node: ast.AST) -> ast.AST | None:
        """The innermost loop of ``node``'s own scope that holds it."""
        found = next((p for p in self.source.ancestors(node) if isinstance(p, (*LOOPS, *SCOPES))), None)
        return found if isinstance(found, LOOPS) else None

    def lightning_step(self, scope: ast.AST) -> bool:
        """Whether ``scope`` is the ``training_step`` of a ``LightningModule`` subclass."""
        bases = getattr(self.source.parent(scope), "bases", []) if isinstance(scope, ast.FunctionDef) else []
        lightning = any((dotted(b) or "").endswith("LightningModule") for b in bases)
        return lightning and getattr(scope, "name", "") == "training_step"

    def no_grad(self, node: ast.AST) -> bool:
        """Whether ``node`` runs with autograd off (or in a grad mode the source leaves open)."""
        for parent in self.source.ancestors(node):
            if isinstance(parent, (ast.With, ast.AsyncWith)) and any(_grad_off(i.context_expr) for i in parent.items):
                return True
            if isinstance(parent, SCOPES):
                return any(_grad_off(d) for d in getattr(parent, "decorator_list", ()))
        return False

    def reaching(self, name: str, stmt: ast.stmt) -> set[ast.stmt]:
        """The statements whose binding of ``name`` may be the one seen at ``stmt`` (none: from outside)."""
        found: list[ast.stmt] = []
        node: ast.AST = stmt
        while not isinstance(node, SCOPES) and (parent := self.source.parent(node)) is not None:
            for block in (getattr(parent, field, None) for field in ("body", "orelse", "finalbody")):
                if isinstance(block, list) and any(s is node for s in block):
                    if self._scan(block[: [id(s) for s in block].index(id(node))], name, found):
                        return set(found)
                    if isinstance(parent, (ast.For, ast.AsyncFor, ast.With, ast.AsyncWith)) and binds(parent, name):
                        return {*found, parent}
            node = parent
        return set(found)

    def _scan(self, block: list[ast.stmt], name: str, found: list[ast.stmt]) -> bool:
        """Add the bindings of ``name`` in ``block`` that reach its end; whether one always does."""
        for stmt in reversed(block):
            if isinstance(stmt, (ast.With, ast.AsyncWith)):
                if self._scan(stmt.body, name, found):
                    return True
                if binds(stmt, name):
                    found.append(stmt)
                    return True
            elif isinstance(stmt, ast.If):
                body, other = self._scan(stmt.body, name, found), self._scan(stmt.orelse, name, found)
                if body and (other or {method(c) for c in calls(stmt.test)} & {"isinstance", "is_tensor", "hasattr"}):
                    return True  # a conversion under a type check is the conversion of a tensor
            elif isinstance(stmt, (*LOOPS, ast.Try)):
                found.extend(s for s in walk_scope(stmt) if isinstance(s, ast.stmt) and binds(s, name))
            elif binds(stmt, name):
                found.append(stmt)
                return True
        return False

    def sources(self, scope: ast.AST) -> dict[str, list[tuple[ast.AST, bool]]]:
        """What ``scope`` differentiates: variable -> (the call or ``return``, whether it is a scalar) each time."""
        out: dict[str, list[tuple[ast.AST, bool]]] = {}
        for expr, scalar, made in self._targets(scope):
            if (name := _root(expr, exact=False)) is not None:
                out.setdefault(name, []).append((made, scalar and _root(expr, exact=True) == name))
        return out

    def _targets(self, scope: ast.AST) -> Iterator[tuple[ast.expr, bool, ast.AST]]:
        for node in walk_scope(scope):
            if isinstance(node, ast.Call):
                yield from ((expr, scalar, node) for expr, scalar in differentiated(node))
            elif isinstance(node, ast.Return) and node.value is not None and self.lightning_step(scope):
                value = node.value  # Lightning differentiates the loss training_step returns
                keys = [getattr(k, "value", None) for k in getattr(value, "keys", ())]
                yield value.values[keys.index("loss")] if "loss" in keys else value, False, node  # type: ignore[attr-defined]

    def flows_to_backward(self, scope: ast.AST) -> set[str]:
        """Every variable of ``scope`` whose value flows, through assignments, into what it differentiates."""
        names, size = {name for expr, _, _ in self._targets(scope) for name in _roots(expr)}, -1
        while size != len(names):
            size = len(names)
            for node in walk_scope(scope):
                if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and node.value is not None:
                    names.update(_roots(node.value) if any(binds(node, n) for n in names) else ())
        return names

    def origin(self, expr: ast.expr, stmt: ast.stmt) -> Origin | None:
        """Why ``expr``, evaluated at ``stmt``, carries an autograd graph; ``None`` when it does not or is unknown."""
        if isinstance(expr, (ast.Name, ast.Attribute)):
            return self._named(expr, stmt)
        if isinstance(expr, (ast.IfExp, ast.List, ast.Tuple, ast.Set, ast.Dict, ast.Starred)):
            parts = [expr.body, expr.orelse] if isinstance(expr, ast.IfExp) else getattr(expr, "elts", None)
            parts = parts or ([expr.value] if isinstance(expr, ast.Starred) else getattr(expr, "values", []))
            return next((o for e in parts if (o := self.origin(e, stmt))), None)
        if self.no_grad(expr):
            return None  # an operation run with autograd off records no graph
        if isinstance(expr, ast.BinOp):
            return self.origin(expr.left, stmt) or self.origin(expr.right, stmt)
        if isinstance(expr, ast.UnaryOp) and not isinstance(expr.op, ast.Not):
            return self.origin(expr.operand, stmt)
        if isinstance(expr, ast.Subscript) and method(expr.value) not in _INDICES:
            return self.origin(expr.value, stmt)
        return self._called(expr, stmt) if isinstance(expr, ast.Call) else None

    def _named(self, expr: ast.Name | ast.Attribute, stmt: ast.stmt) -> Origin | None:
        name = dotted(expr)
        if isinstance(expr, ast.Attribute) and (expr.attr in _PLAIN_ATTRS or name is None):
            return None if expr.attr in _PLAIN_ATTRS else self.origin(expr.value, stmt)
        defs = self.reaching(name or "", stmt)
        for made, _ in self.sources(self.source.scope_of(stmt)).get(name or "", ()):
            there = self.reaching(name or "", self.statement(made))
            if defs & there or defs == there:  # the very value that is differentiated
                return Origin("returned" if isinstance(made, ast.Return) else "backward", made)
        for define in sorted(defs, key=lambda d: d.lineno):  # each lies before stmt: no cycle
            direct = isinstance(define, (ast.AugAssign, ast.AnnAssign)) or any(
                dotted(t) == name for t in getattr(define, "targets", ()))  # fmt: skip
            value = getattr(define, "value", None) if direct else None
            found = self.origin(value, define) if value is not None else None
            if found := found or (self._named(expr, define) if isinstance(define, ast.AugAssign) else None):
                return found
        return self.origin(expr.value, stmt) if not defs and isinstance(expr, ast.Attribute) else None

    def _called(self, call: ast.Call, stmt: ast.stmt) -> Origin | None:
        func, name = call.func, dotted(call.func) or ""
        if isinstance(func, ast.Attribute) and func.attr in _KEEPS:
            integer = any(re.search(r"long|int|bool", dotted(a) or "") for a in call.args)
            return None if integer else self.origin(func.value, stmt)
        if name in _GATHERS or method(call) == "scale":
            items = [e for a in call.args for e in (a.elts if isinstance(a, (ast.List, ast.Tuple)) else [a])]
            return next((o for item in items if (o := self.origin(item, stmt))), None)
        scope, loop = self.source.scope_of(call), self.loop_of(call)
        step = self.lightning_step(scope)
        if not (step or loop in self.training):
            return None  # no backward() here: the grad mode, and what the call makes, are left to the run
        prefix, _, last = name.removesuffix(".forward").rpartition(".")
        functional = prefix.rsplit(".", 1)[-1] in ("F", "functional") and (
            last.endswith("_loss") or last in _LOSS_FUNCS
        )
        if functional or name in self.losses or _LOSS_NAME.fullmatch(last.lower()):
            return Origin("loss", call)
        low, owner = last.lower(), self.source.parent(scope)
        helpers = {f.name for f in getattr(owner, "body", ()) if isinstance(f, ast.FunctionDef)} - {"forward"}
        model = name not in self.frozen and (
            last in ("G", "D")
            or (_MODEL.fullmatch(low) is not None and not _FROZEN & set(low.split("_")))
            or (name == "self" and isinstance(owner, ast.ClassDef))
            or (step and prefix == "self" and last not in helpers and not _NOT_STEP.search(low))
        )
        return Origin("model", call) if model else None
