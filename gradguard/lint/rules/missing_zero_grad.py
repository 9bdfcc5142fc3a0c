"""GG101 missing-zero-grad, static form: a training loop that steps with gradients nothing resets.

Example:
    >>> code = "for x, y in loader:\\n    loss = f(model(x), y)\\n    loss.backward()\\n    optimizer.step()\\n"
    >>> [(h.node.lineno, h.where, h.lines) for h in MissingZeroGrad().check(Source("t.py", code))]
    [(4, 'optimizer', (1, 3, 4))]
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterator

from gradguard.lint.loops import Index, Step, is_backward, is_reset, manual_update
from gradguard.lint.rule import Hit, LintRule
from gradguard.lint.source import Source
from gradguard.lint.syntax import LOOPS, method, walk, walk_scope

#: Calls that take an optimizer and never reset its gradients.
_SAFE = frozenset(
    {"unscale_", "step", "update", "isinstance", "len", "print", "getattr", "hasattr", "id", "type", "repr", "str",
     "log", "info", "debug", "warning", "clip_gradients", "clip_grad_norm_", "clip_grad_value_", "append", "scale_loss"}
)  # fmt: skip


@dataclasses.dataclass
class _Loop:
    """What one loop does in its own body (nested loops included, nested functions not)."""

    node: ast.For | ast.AsyncFor | ast.While
    backwards: list[ast.AST] = dataclasses.field(default_factory=list)
    steps: list[Step] = dataclasses.field(default_factory=list)
    updates: list[tuple[ast.stmt, str]] = dataclasses.field(default_factory=list)
    resets: list[ast.AST] = dataclasses.field(default_factory=list)
    rebound: set[str] = dataclasses.field(default_factory=set)
    unsure: bool = False

    @property
    def trains(self) -> bool:
        return bool(self.backwards) and bool(self.steps or self.updates)


def _survey(index: Index, loop: ast.For | ast.AsyncFor | ast.While) -> _Loop:
    info = _Loop(loop)
    nodes = [n for stmt in loop.body for n in walk_scope(stmt) if isinstance(n, (ast.stmt, ast.Call))]
    for node in nodes:
        if is_backward(node):
            info.backwards.append(node)
        elif is_reset(node) or index.reaches(node, "reset"):
            info.resets.append(node)
        elif (step := index.step(node)) is not None:
            info.steps.append(step)
        elif isinstance(node, ast.stmt) and (name := manual_update(node)) is not None:
            info.updates.append((node, name))
        elif index.unknown_self_call(node):
            info.unsure = True  # a base class from elsewhere may reset there
        if isinstance(node, ast.Assign):
            info.rebound.update(ast.unparse(t) for t in node.targets)
    for step in info.steps:
        if step.closure is None:
            continue
        fns = index.closure(step.closure)
        if fns is None:
            info.unsure = True  # a closure defined elsewhere
            continue
        inside = [n for fn in fns for n in walk_scope(fn) if isinstance(n, (ast.stmt, ast.Call))]
        info.backwards.extend(n for n in inside if is_backward(n))
        if any(is_reset(n) or index.reaches(n, "reset") for n in inside):
            info.resets.append(step.call)
    info.steps.sort(key=lambda s: (s.call.lineno, s.call.col_offset))
    info.updates.sort(key=lambda u: (u[0].lineno, u[0].col_offset))
    names = {s.optimizer for s in info.steps}
    for node in nodes:  # the optimizer handed to a function from elsewhere, which may reset it
        if isinstance(node, ast.Call) and method(node) not in _SAFE and method(node) not in index.defs:
            values = [*node.args, *(k.value for k in node.keywords)]
            info.unsure |= any(ast.unparse(v) in names for v in values)
    return info


def _repeats(source: Source, node: ast.AST, loop: ast.AST, updates: set[ast.AST]) -> bool:
    """Whether ``node`` may run on many passes of ``loop``: not under a one-off ``if`` (``if i == last:``).

    A branch counts when its test is periodic (``if (i + 1) % k == 0:``) or when the other
    branch updates too (``if amp: scaler.step(opt) else: opt.step()``).
    """
    child = node
    for parent in source.ancestors(node):
        if parent is loop:
            return True
        if isinstance(parent, (ast.ExceptHandler, ast.match_case)):
            return False
        if isinstance(parent, ast.If) and child is not parent.test:
            periodic = any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.Mod) for n in walk(parent.test))
            other = parent.orelse if any(child is s for s in parent.body) else parent.body
            if not periodic and not any(n in updates for s in other for n in walk(s)):
                return False
        child = parent
    return True


def _code(node: ast.AST) -> str:
    text = ast.unparse(node).splitlines()[0]
    return text if len(text) <= 60 else text[:57] + "..."


def _backwards(nodes: list[ast.AST]) -> tuple[str, list[int]]:
    """``"`loss.backward()` (line 3) adds"`` for the message, and the lines."""
    seen: dict[int, ast.AST] = {}
    for node in nodes:
        seen.setdefault(node.lineno, node)  # type: ignore[attr-defined]
    shown = [f"`{_code(n)}` (line {line})" for line, n in sorted(seen.items())]
    if len(shown) > 3:
        shown = [*shown[:2], f"{len(shown) - 2} more"]
    text = shown[0] + " adds" if len(shown) == 1 else ", ".join(shown[:-1]) + f" and {shown[-1]} add"
    return text, sorted(seen)


class MissingZeroGrad(LintRule):
    """GG101: a loop calls ``backward()`` and ``step()`` and nothing in it resets the gradients."""

    code = "GG101"
    name = "missing-zero-grad"
    hint = "Call optimizer.zero_grad() once per step, before backward() (or after step())"

    static_form = (
        "`gradguard lint` flags a `for` or `while` loop that calls `backward()` (`loss.backward()`, "
        "`scaler.scale(loss).backward()`, `accelerator.backward(loss)`, or inside the closure passed to "
        "`step(closure)`) and then updates the parameters (`optimizer.step()`, `scaler.step(optimizer)`, or by "
        "hand: `w.data.sub_(lr * w.grad)`, `p -= lr * p.grad`) while nothing in the loop, in any branch, resets "
        "the gradients: no `zero_grad()` of an optimizer or a model, no `p.grad = None` or `p.grad.zero_()`, no "
        "call of a function of the same file that does one of these. A reset before the loop or after it does "
        "not count. With several optimizers whose only resets are their own `zero_grad()`, an optimizer that "
        "is stepped and never reset is flagged too. It stays silent when the loop calls a closure, a method of "
        "a base class or a function that receives the optimizer and is defined elsewhere, when the step runs "
        "under a one-off `if`, and in a function with no loop (the caller may reset); those are left to the run."
    )

    def relevant(self, text: str) -> bool:
        return (".backward(" in text or "_backward(" in text) and ("step" in text or ".grad" in text)

    def check(self, source: Source) -> Iterator[Hit]:
        if "register_step_post_hook" in source.text or "register_step_pre_hook" in source.text:
            return  # a hook may reset the gradients at every step
        index = Index.of(source)
        loops = {n: _survey(index, n) for n in walk(source.tree) if isinstance(n, LOOPS)}
        for loop, info in loops.items():
            nested = (loops[n] for n in walk_scope(loop) if n is not loop and n in loops)
            if info.trains and not info.unsure and not any(inner.trains for inner in nested):
                yield from self._loop(source, info)

    def _loop(self, source: Source, info: _Loop) -> Iterator[Hit]:
        names = {s.optimizer for s in info.steps}
        reset_by: set[str] = set()
        for reset in info.resets:
            func = reset.func if isinstance(reset, ast.Call) and method(reset) == "zero_grad" else None
            owner = func.value if isinstance(func, ast.Attribute) else None
            if owner is None or ast.unparse(owner) not in names:
                reset_by = set()
                break
            reset_by.add(ast.unparse(owner))
        if info.resets and (not reset_by or len(names) < 2):
            return  # something resets; per optimizer only when each reset is an optimizer's own
        doing: set[ast.AST] = {s.call for s in info.steps} | {u for u, _ in info.updates}
        text, lines = _backwards(info.backwards)
        start = info.node.lineno
        for step in info.steps:
            if step.optimizer in reset_by or step.optimizer in info.rebound:
                continue
            if not _repeats(source, step.call, info.node, doing):
                continue
            at = f"`{_code(step.call)}` (line {step.call.lineno}) applies the gradients that {text} to"
            if reset_by:
                only = " and ".join(f"`{r}`" for r in sorted(reset_by))
                message = (
                    f"{at}, and the loop from line {start} resets only {only}, never `{step.optimizer}`: "
                    f"each step of `{step.optimizer}` applies the sum of all earlier steps' gradients"
                )
            else:
                scope = f"the loop from line {start}" + (" or in its closure" if step.closure is not None else "")
                message = (
                    f"{at}, and nothing in {scope} resets them: "
                    "each step applies the sum of all earlier steps' gradients"
                )
            data = {"optimizer": step.optimizer, "loop": start, "backward": lines}
            yield Hit(
                step.call,
                message,
                where=step.optimizer,
                lines=tuple(sorted({start, *lines, step.call.lineno})),
                data=data,
            )
        for stmt, param in [] if reset_by else info.updates:
            if param in info.rebound or not _repeats(source, stmt, info.node, doing):
                continue
            message = (
                f"`{_code(stmt)}` (line {stmt.lineno}) updates `{param}` with the gradient that {text} to, "
                f"and nothing in the loop from line {start} resets it: each update applies the sum of all "
                "earlier gradients"
            )
            data = {"parameter": param, "loop": start, "backward": lines}
            yield Hit(stmt, message, where=param, lines=tuple(sorted({start, *lines, stmt.lineno})), data=data)
