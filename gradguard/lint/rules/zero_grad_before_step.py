"""GG102 zero-grad-before-step, static form: gradients reset after ``backward()`` and before ``step()``.

Example:
    >>> code = "for x in loader:\\n    f(x).backward()\\n    optimizer.zero_grad()\\n    optimizer.step()\\n"
    >>> [(h.node.lineno, h.where, h.lines) for h in ZeroGradBeforeStep().check(Source("t.py", code))]
    [(3, 'optimizer', (2, 3, 4))]
"""

from __future__ import annotations

import ast
from collections.abc import Iterator

from gradguard.lint.loops import Index, Step, is_backward, writes_grad
from gradguard.lint.rule import Hit, LintRule
from gradguard.lint.source import Source
from gradguard.lint.syntax import SCOPES, dotted, method, walk, walk_scope

_WITH = (ast.With, ast.AsyncWith)
_TRY = (ast.Try, getattr(ast, "TryStar", ast.Try))
_COMPOUND = (ast.If, ast.For, ast.AsyncFor, ast.While, *_WITH, *_TRY, ast.Match)


def erases(stmt: ast.AST) -> tuple[ast.expr, ast.AST] | None:
    """What a statement surely resets every gradient of, and the node that does it.

    ``opt.zero_grad()`` resets ``opt``; a loop over ``model.parameters()`` that sets
    ``p.grad = None`` (or calls ``p.grad.zero_()``) resets ``model``.

    >>> owner, node = erases(ast.parse("for p in net.parameters():\\n    p.grad = None").body[0])
    >>> ast.unparse(owner), node.lineno
    ('net', 2)
    """
    if isinstance(stmt, ast.Expr) and method(stmt.value) == "zero_grad" and isinstance(stmt.value, ast.Call):
        func = stmt.value.func
        return (func.value, stmt.value) if isinstance(func, ast.Attribute) else None
    if not isinstance(stmt, ast.For) or method(stmt.iter) not in ("parameters", "named_parameters"):
        return None
    owner = stmt.iter.func.value if isinstance(stmt.iter.func, ast.Attribute) else None  # type: ignore[attr-defined]
    target = stmt.target.elts[-1] if isinstance(stmt.target, ast.Tuple) and stmt.target.elts else stmt.target
    var = dotted(target)
    if owner is None or var is None:
        return None
    guards = (f"{var}.grad is not None", f"{var}.requires_grad")
    for inner in stmt.body:
        body = inner.body if isinstance(inner, ast.If) and ast.unparse(inner.test) in guards else [inner]
        for s in body:
            if isinstance(s, ast.Assign) and ast.unparse(s) == f"{var}.grad = None":
                return owner, s
            if isinstance(s, ast.Expr) and ast.unparse(s) in (f"{var}.grad.zero_()", f"{var}.grad.data.zero_()"):
                return owner, s
    return None


def _block(source: Source, stmt: ast.AST) -> tuple[ast.AST, str, list[ast.stmt]] | None:
    """The statement list that holds ``stmt``: its owner, the field and the list."""
    parent = source.parent(stmt)
    for field in ("body", "orelse", "finalbody"):
        block = getattr(parent, field, None)
        if parent is not None and isinstance(block, list) and any(s is stmt for s in block):
            return parent, field, block
    return None


def _unwith(stmts: list[ast.stmt], *, backwards: bool = False) -> Iterator[ast.stmt]:
    """The statements in order (or in reverse), the bodies of ``with`` blocks opened in place."""
    for stmt in reversed(stmts) if backwards else stmts:
        if isinstance(stmt, _WITH):
            yield from _unwith(stmt.body, backwards=backwards)
        elif not isinstance(stmt, SCOPES):
            yield stmt


def _before(source: Source, stmt: ast.AST) -> Iterator[ast.stmt]:
    """The statements that surely ran before ``stmt`` (through ``if``/``with``/``try`` bodies), nearest first."""
    node = stmt
    while (found := _block(source, node)) is not None:
        parent, field, block = found
        index = next(i for i, s in enumerate(block) if s is node)
        yield from _unwith(block[:index], backwards=True)
        if not (isinstance(parent, (ast.If, *_WITH)) or (isinstance(parent, _TRY) and field == "body")):
            return
        node = parent


def _after(source: Source, stmt: ast.AST) -> Iterator[ast.stmt]:
    """The statements that run right after ``stmt`` in straight line (out of ``with`` blocks too)."""
    node = stmt
    while (found := _block(source, node)) is not None:
        parent, _, block = found
        index = next(i for i, s in enumerate(block) if s is node)
        yield from _unwith(block[index + 1 :])
        if not isinstance(parent, _WITH):
            return
        node = parent


def _disturbs(index: Index, stmt: ast.stmt) -> bool:
    """Whether ``stmt`` may give gradients back or leave: ``backward()``, a write to ``.grad``, a helper, a jump."""
    for node in walk_scope(stmt):
        if isinstance(node, (ast.Return, ast.Break, ast.Continue, ast.Raise)) or writes_grad(node):
            return True
        if isinstance(node, ast.Call):
            name = (method(node) or "").lower()
            if "backward" in name or ("grad" in name and not name.startswith("clip_grad")) or name in index.defs:
                return True
            step = index.step(node)
            if step is not None and (step.closure is not None or isinstance(stmt, _COMPOUND)):
                return True
    return False


def _covers(source: Source, index: Index, owner: ast.expr, step: Step, stmt: ast.AST) -> bool:
    """Whether resetting ``owner`` erases every gradient that ``step`` applies."""
    name = ast.unparse(owner)
    if name == step.optimizer:
        return True
    if index.optimizer_like(owner):
        return False  # another optimizer: a GAN resets one and steps the other
    built = index.built(step.optimizer, stmt)
    if built:
        return all(isinstance(call, ast.Call) and _built_from(call, name) for call in built)
    # the optimizer is built elsewhere: it must be the only one the class (or else the function) steps
    cls = next((a for a in reversed(list(source.ancestors(stmt))) if isinstance(a, ast.ClassDef)), None)
    nodes = walk(cls) if cls is not None else walk_scope(source.scope_of(stmt))
    return len({s.optimizer for n in nodes if (s := index.step(n)) is not None}) == 1


def _built_from(call: ast.Call, model: str) -> bool:
    """Whether an optimizer's parameters all come from ``model`` (``SGD(model.parameters())``)."""
    params = call.args[0] if call.args else next((k.value for k in call.keywords if k.arg == "params"), None)
    owners = [
        ast.unparse(n.func.value)
        for n in (walk(params) if params is not None else ())
        if isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr in ("parameters", "named_parameters")
    ]
    return bool(owners) and all(o == model or o.startswith(model + ".") for o in owners)


class ZeroGradBeforeStep(LintRule):
    """GG102: a reset runs after ``backward()`` and before the step that should apply its gradients."""

    code = "GG102"
    name = "zero-grad-before-step"
    hint = "Reset the gradients before backward() or after step(), never between them"

    static_form = (
        "`gradguard lint` flags a reset that runs, in straight line, after a `backward()` and before the "
        "`step()` of the optimizer whose gradients it erases, with no `backward()` in between: "
        "`loss.backward(); optimizer.zero_grad(); optimizer.step()`. The reset is `zero_grad()` of that "
        "optimizer, or of a model (`model.zero_grad()`, a loop over `model.parameters()` setting "
        "`p.grad = None`) when the optimizer was built from that model's parameters or is the only one the "
        "function steps. It stays silent when the reset is under an `if` of its own, when the step takes a "
        "closure, when gradients are written back (`p.grad = g`) or anything that may call `backward()` "
        "runs between the reset and the step, and for a reset of one optimizer before another's step (a "
        "GAN); a reset in another function, or by hand with `p.grad.zero_()` outside such a loop, is left "
        "to the run."
    )

    def relevant(self, text: str) -> bool:
        called = ".backward(" in text or "_backward(" in text
        return called and "step" in text and ("zero_grad" in text or ".grad" in text)

    def check(self, source: Source) -> Iterator[Hit]:
        index = Index.of(source)
        for stmt in walk(source.tree):
            erased = erases(stmt) if isinstance(stmt, ast.stmt) else None
            if erased is not None:
                hit = self._reset(source, index, stmt, *erased)
                if hit is not None:
                    yield hit

    def _reset(self, source: Source, index: Index, stmt: ast.AST, owner: ast.expr, at: ast.AST) -> Hit | None:
        step = None
        for later in _after(source, stmt):
            found = index.step(later.value) if isinstance(later, ast.Expr) else None
            if found is not None and found.closure is None and _covers(source, index, owner, found, stmt):
                step = found
                break
            if _disturbs(index, later):
                return None
        if step is None:
            return None
        backward = None
        for earlier in _before(source, stmt):
            inside = list(walk_scope(earlier))
            if any((s := index.step(n)) is not None and s.optimizer == step.optimizer for n in inside):
                return None  # the gradients were applied since
            if any(index.reaches(n, "step") or index.reaches(n, "backward") for n in inside):
                return None
            found_backward = [n for n in inside if is_backward(n)]
            if found_backward:
                if isinstance(earlier, _COMPOUND):
                    return None  # a backward() that may not have run
                backward = found_backward[0]
                break
        if backward is None:
            return None
        model = ast.unparse(owner)
        reset = ast.unparse(at).splitlines()[0]
        lines = (backward.lineno, at.lineno, stmt.lineno, step.call.lineno)  # type: ignore[attr-defined]
        what = "the gradients" if model == step.optimizer else f"the gradients of `{model}`"
        if isinstance(stmt, ast.For):
            reset = f"{reset}` in the loop over `{ast.unparse(stmt.iter)}"
        message = (
            f"`{reset}` (line {at.lineno}) resets {what} that `{ast.unparse(backward)}` (line "  # type: ignore[attr-defined]
            f"{backward.lineno}) computed, before `{ast.unparse(step.call)}` (line {step.call.lineno}) applies "  # type: ignore[attr-defined]
            "them: the step gets no gradient, so the parameters do not learn from them"
        )
        data = {"optimizer": step.optimizer, "reset": model, "backward": backward.lineno}  # type: ignore[attr-defined]
        return Hit(at, message, where=step.optimizer, lines=tuple(sorted(set(lines))), data=data)
