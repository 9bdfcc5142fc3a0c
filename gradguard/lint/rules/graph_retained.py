"""GG201 graph-retained, static form: a tensor with an autograd graph accumulated across loop iterations.

Example:
    >>> src = Source("t.py", "total = 0\\nfor x, y in data:\\n    loss = crit(model(x), y)\\n    loss.backward()\\n"
    ...              "    total += loss\\nprint(total)\\n")
    >>> [(h.node.lineno, h.where, h.lines, h.fix.title) for h in GraphRetained().check(src)]
    [(5, 'total', (2, 4), 'Add .item(): total holds a number, not the graph')]
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator

from gradguard.lint.rule import Hit, LintRule
from gradguard.lint.source import Edit, Fix, Source
from gradguard.lint.syntax import LOOPS, dotted, method, receiver, walk, walk_scope
from gradguard.lint.taint import Origin, Taint, binds

_ADDS = {"append": 0, "appendleft": 0, "insert": 1, "extend": 0}
_PASS = frozenset({"round", "abs", "max", "min", "sum"})  # what these give is used as the number was
_SINKS = frozenset({"print", "float", "int", "str", "repr", "format", "bool"})
_ANY_SINK = frozenset({"format", "add_scalar", "add_scalars", "set_postfix", "set_postfix_str", "set_description",
                       "set_description_str", "log_metric", "log_metrics", "log_dict"})  # fmt: skip
_LOGS = frozenset({"info", "debug", "warning", "warn", "error", "critical", "exception", "log", "write"})
_LOGGER = re.compile(r"log|writer|wandb|mlflow|tqdm|bar|progress|experiment|tracker|accelerator|fabric|^self$")
_VERBS = {"+=": ("adds", "to"), "=": ("adds", "to"), "[]": ("stores", "in"), "add": ("keeps", "in")}


def accumulation(stmt: ast.AST) -> tuple[ast.expr, list[ast.expr], str] | None:
    """What ``stmt`` accumulates into: the variable, the values added, the form (``+=``, ``=``, ``[]``, ``add``).

    >>> target, values, form = accumulation(ast.parse("losses.extend([a, b])").body[0])
    >>> ast.unparse(target), [ast.unparse(v) for v in values], form
    ('losses', ['a', 'b'], 'add')
    """
    if isinstance(stmt, ast.AugAssign) and isinstance(stmt.op, ast.Add):
        return _base(stmt.target), [stmt.value], "+="
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
        target = stmt.targets[0]
        if isinstance(target, ast.Subscript):
            return _base(target.value), [stmt.value], "[]"
        terms = _terms(stmt.value)
        name = dotted(target)
        if name is not None and len(terms) > 1 and any(dotted(t) == name for t in terms):
            return target, [t for t in terms if dotted(t) != name], "="
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call) and method(stmt.value) in _ADDS:
        call = stmt.value
        index = _ADDS[method(call) or ""]
        if not isinstance(call.func, ast.Attribute) or len(call.args) <= index:
            return None
        value = call.args[index]
        values = value.elts if method(call) == "extend" and isinstance(value, (ast.List, ast.Tuple)) else [value]
        return _base(call.func.value), [] if method(call) == "extend" and values == [value] else values, "add"
    return None


def _base(node: ast.expr) -> ast.expr:
    """The container under its keys: ``history`` for ``history["loss"]``."""
    while isinstance(node, ast.Subscript):
        node = node.value
    return node


def _terms(node: ast.expr) -> list[ast.expr]:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
        return _terms(node.left) + _terms(node.right)
    return [node]


class GraphRetained(LintRule):
    """A graph tensor kept across the iterations of a training loop: ``total += loss``, ``losses.append(loss)``.

    >>> src = Source("t.py", "for x, y in d:\\n    out = net(x)\\n    crit(out, y).backward()\\n    o.append(out)\\n")
    >>> [(h.node.lineno, h.where, h.data["origin"]) for h in GraphRetained().check(src)]
    [(4, 'o', 'model')]
    """

    code = "GG201"
    name = "graph-retained"
    hint = "Add loss.item() (a number) or loss.detach() (a tensor) instead of the loss itself"
    words = (".backward(", "_backward(", "autograd.grad", "training_step")  # nothing differentiated: no loop trains
    static_form = (
        "`gradguard lint` flags a tensor that carries an autograd graph added to a variable that outlives the "
        "iteration of a training loop (one that calls `backward()`), or of a Lightning `training_step`: "
        "`total += loss`, `total = total + loss`, `losses.append(loss)`, `.extend([...])`, `.insert(i, loss)` "
        "and `losses[i] = loss`, onto a variable created before the loop or an attribute `self.losses`. "
        "A tensor carries a graph when the loop differentiates it (`loss.backward()`, "
        "`accelerator.backward(loss)`, `scaler.scale(loss).backward()`, the loss `training_step` returns), "
        "or a loss function or the model makes it there, and when arithmetic computes it from such a tensor; "
        "`.item()`, `.detach()`, `float()` and work under `torch.no_grad()` carry none. A container emptied at "
        "every iteration, or an accumulator that is itself differentiated later (gradient accumulation, "
        "`torch.stack(losses).mean().backward()`), is correct and not flagged. `--fix` turns "
        "`total += loss` into `total += loss.item()` when `loss` is the scalar the loop differentiates (or it "
        "times a number) and `total` starts as a number and is only ever used as one; an `append` keeps the "
        "hint. What the source cannot decide, the grad mode of an evaluation function or a tensor made "
        "elsewhere (by a helper, a parameter), is left to the run."
    )

    def check(self, source: Source) -> Iterator[Hit]:
        taint = Taint(source)
        places: list[ast.AST] = [node for node in taint.training if isinstance(node, LOOPS)]
        if "training_step" in source.text:
            places += [node for node in walk(source.tree) if taint.lightning_step(node)]
        seen: set[int] = set()
        for stmt in (node for place in places for node in walk_scope(place)):
            found = accumulation(stmt) if id(stmt) not in seen else None
            seen.add(id(stmt))
            hit = self._hit(source, taint, stmt, *found) if found is not None else None  # type: ignore[arg-type]
            if hit is not None:
                yield hit

    def _hit(
        self, source: Source, taint: Taint, stmt: ast.stmt, target: ast.expr, values: list[ast.expr], form: str
    ) -> Hit | None:
        where, scope = dotted(target), source.scope_of(stmt)
        if where is None:
            return None
        if where.startswith("self.") and taint.lightning_step(scope):
            context: ast.AST = scope
        else:
            loop = taint.loop_of(stmt)
            if loop not in taint.training:
                return None  # not a training loop: an evaluation loop's grad mode is left to the run
            context = loop
        if _fresh(taint, where, stmt, context) or (form in ("+=", "=") and taint.no_grad(stmt)):
            return None
        graph = next(((v, o) for v in values if (o := taint.origin(v, stmt)) is not None), None)
        if graph is None or where in taint.flows_to_backward(scope):
            return None  # no graph, or the accumulator is itself differentiated (gradient accumulation)
        value, origin = graph
        fix = self._fix(source, taint, stmt, value, context) if form == "+=" else None
        verb, prep = _VERBS[form]
        text = _short(source.segment(stmt))
        lives = (
            "which outlives each call of `training_step` (one per batch)"
            if context is scope
            else f"which lives across the iterations of the loop at line {context.lineno}"  # type: ignore[attr-defined]
        )
        message = (
            f"`{text}` (line {stmt.lineno}) {verb} {_describe(source, origin)} {prep} `{where}`, {lives}: "
            "it keeps the autograd graph of every step alive, so memory grows with each iteration"
        )
        lines = (context.lineno, origin.node.lineno)  # type: ignore[attr-defined]
        data = {"variable": where, "origin": origin.kind, "origin_line": origin.node.lineno}  # type: ignore[attr-defined]
        return Hit(stmt, message, where=where, fix=fix, lines=lines, data=data)

    def _fix(self, source: Source, taint: Taint, stmt: ast.stmt, value: ast.expr, loop: ast.AST) -> Fix | None:
        target, scope = getattr(stmt, "target", None), source.scope_of(stmt)
        if not (
            isinstance(target, ast.Name) and value.lineno == value.end_lineno and _scalar(taint, value, stmt, loop)
        ):
            return None
        if not (_stores_numbers(taint, target.id, scope, loop) and numbers_only(taint, target.id, scope)):
            return None
        start, end = source.span(value)
        simple = isinstance(value, (ast.Name, ast.Attribute))
        edits = (Edit(end, end, ".item()"),) if simple else (Edit(start, start, "("), Edit(end, end, ").item()"))
        return Fix(f"Add .item(): {target.id} holds a number, not the graph", edits)


# ---------------------------------------------------------------- when .item() is always safe
def _number(taint: Taint, expr: ast.expr, stmt: ast.stmt) -> bool:
    """Whether ``expr`` is a Python number or a count (``1``, ``x.size(0)``, ``len(b)``, ``loss.item()``)."""
    if isinstance(expr, (ast.UnaryOp, ast.BinOp)):
        return all(_number(taint, e, stmt) for e in ast.iter_child_nodes(expr) if isinstance(e, ast.expr))
    if isinstance(expr, ast.Call):
        name = method(expr) if isinstance(expr.func, ast.Attribute) else "." + (dotted(expr.func) or "")
        return name in ("item", "numel", ".float", ".int", ".len") or (name == "size" and len(expr.args) == 1)
    if isinstance(expr, ast.Name):  # every definition that reaches it is a number (each lies before: no cycle)
        defs = taint.reaching(expr.id, stmt)
        return bool(defs) and all(isinstance(d, ast.Assign) and _number(taint, d.value, d) for d in defs)
    shape = isinstance(expr, ast.Subscript) and getattr(expr.value, "attr", None) == "shape"
    return shape or (isinstance(expr, ast.Constant) and type(expr.value) in (int, float))


def _scalar(taint: Taint, expr: ast.expr, stmt: ast.stmt, loop: ast.AST) -> bool:
    """Whether ``expr`` is the scalar ``loop`` differentiates (no gradient given), or it times a number."""
    if isinstance(expr, ast.BinOp) and isinstance(expr.op, (ast.Mult, ast.Div)):
        if _scalar(taint, expr.left, stmt, loop) and _number(taint, expr.right, stmt):
            return True
        return (
            isinstance(expr.op, ast.Mult) and _number(taint, expr.left, stmt) and _scalar(taint, expr.right, stmt, loop)
        )
    name, inside = dotted(expr), {id(n) for n in walk_scope(loop)}
    return name is not None and any(
        scalar and id(made) in inside and taint.reaching(name, stmt) == taint.reaching(name, taint.statement(made))
        for made, scalar in taint.sources(taint.source.scope_of(stmt)).get(name, ())
    )


def _stores_numbers(taint: Taint, name: str, scope: ast.AST, loop: ast.AST) -> bool:
    """``name`` starts as a number literal before ``loop`` and is only ``+=``-ed numbers or scalar losses."""
    literal = False
    for node in walk(scope):
        if not (isinstance(node, ast.stmt) and binds(node, name)):
            continue
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            value = node.value.operand if isinstance(node.value, ast.UnaryOp) else node.value
            number = isinstance(value, ast.Constant) and type(value.value) in (int, float)
            literal = literal or (number and not any(n is node for n in walk(loop)))
            if not (number or any(isinstance(n, ast.Name) and n.id == name for n in walk(node.value))):
                return False  # T = T / n keeps a number a number
        elif not (isinstance(node, ast.AugAssign) and isinstance(node.op, ast.Add)) or not (
            _number(taint, node.value, node) or _scalar(taint, node.value, node, taint.loop_of(node) or scope)
        ):
            return False
    return literal


def numbers_only(taint: Taint, name: str, scope: ast.AST, seen: set[str] | None = None) -> bool:
    """Whether every use of the local ``name`` in ``scope`` treats it as a number (arithmetic, printing, logs).

    >>> src = Source("t.py", "def f(xs):\\n    t = 0\\n    for x in xs:\\n        t += x\\n    print(f'{t / 2}')\\n")
    >>> numbers_only(Taint(src), "t", src.tree.body[0]), numbers_only(Taint(src), "xs", src.tree.body[0])
    (True, False)
    """
    seen = seen if seen is not None else set()
    seen.add(name)
    for node in walk(scope):
        if isinstance(node, (ast.Global, ast.Nonlocal)) and name in node.names:
            return False
        if isinstance(node, ast.Name) and node.id == name:
            if taint.source.scope_of(node) is not scope or isinstance(node.ctx, ast.Del):
                return False  # used by a nested function, or deleted
            if isinstance(node.ctx, ast.Load) and not _number_use(taint, node, scope, seen):
                return False
    return True


def _number_use(taint: Taint, node: ast.AST, scope: ast.AST, seen: set[str]) -> bool:
    parent = taint.source.parent(node)
    outer = taint.source.parent(parent) if isinstance(parent, ast.Tuple) else parent
    left = getattr(outer, "left", None)
    text = isinstance(left, ast.JoinedStr) or (isinstance(left, ast.Constant) and isinstance(left.value, str))
    if text and isinstance(outer, ast.BinOp) and isinstance(outer.op, ast.Mod) and outer.right in (node, parent):
        return True  # "%.3f" % total, "%d %f" % (step, total)
    if isinstance(parent, (ast.BinOp, ast.UnaryOp, ast.keyword, ast.Dict)) or (
        isinstance(parent, ast.IfExp) and node is not parent.test
    ):
        return _number_use(taint, parent, scope, seen)
    if isinstance(parent, (ast.Compare, ast.FormattedValue, ast.Expr, ast.If, ast.While, ast.IfExp)):
        return True
    if isinstance(parent, ast.Call) and node is not parent.func:
        name, last = dotted(parent.func) or "", method(parent) or ""
        if name in _PASS:
            return _number_use(taint, parent, scope, seen)
        logs = last in _LOGS and bool(_LOGGER.search((dotted(getattr(parent.func, "value", None)) or "").lower()))
        return name in _SINKS or name.startswith("math.") or last in _ANY_SINK or logs
    if isinstance(parent, (ast.Assign, ast.AugAssign, ast.AnnAssign)) and node is parent.value:
        targets = getattr(parent, "targets", [getattr(parent, "target", None)])
        if len(targets) == 1 and isinstance(targets[0], ast.Name):
            return targets[0].id in seen or numbers_only(taint, targets[0].id, scope, seen)
    return False


def _fresh(taint: Taint, name: str, stmt: ast.stmt, context: ast.AST) -> bool:
    """Whether each iteration of ``context`` makes ``name`` anew before ``stmt`` (``losses = []``, ``.clear()``)."""
    body = context.body  # type: ignore[attr-defined]
    if any(isinstance(s, ast.Expr) and method(s.value) == "clear" and receiver(s.value) == name for s in body):
        return True
    inside, defs = {id(node) for node in walk_scope(context)}, taint.reaching(name, stmt)
    # the loop's own variable, or a binding in the loop that always runs first (through earlier += of it)
    return bool(defs) and all(
        id(d) in inside and (accumulation(d) is None or _fresh(taint, name, d, context)) for d in defs
    )


def _describe(source: Source, origin: Origin) -> str:
    text, line = _short(source.segment(origin.node)), origin.node.lineno  # type: ignore[attr-defined]
    if origin.kind == "backward":
        return f"the tensor that `{text}` differentiates (line {line})"
    if origin.kind == "returned":
        return f"the loss that `training_step` returns for Lightning to differentiate (line {line})"
    return f"a tensor computed by the {origin.kind} `{text}` (line {line})"


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 60 else text[:57] + "..."
