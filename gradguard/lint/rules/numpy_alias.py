"""GG501 numpy-alias-mutated, static form: a tensor sharing a buffer's memory kept while a loop refills the buffer.

Example:
    >>> code = "buf = np.empty(4)\\nfor f in files:\\n    f.readinto(buf)\\n    data.append(torch.from_numpy(buf))\\n"
    >>> [(h.node.lineno, h.where, h.lines) for h in NumpyAlias().check(Source("t.py", code))]
    [(4, 'buf', (2, 4, 3, 4))]
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterator

from gradguard.lint.aliasing import Arrays, Conversion, base_of, bindings, bound_in, loop_nodes, prefixes
from gradguard.lint.rule import Hit, LintRule
from gradguard.lint.source import Source
from gradguard.lint.syntax import LOOPS, SCOPES, dotted, method, receiver, walk, walk_scope

_VIEWS = frozenset(
    {"view", "view_as", "reshape", "reshape_as", "unsqueeze", "squeeze", "permute", "transpose", "t", "flatten",
     "unflatten", "expand", "expand_as", "narrow", "select", "unfold", "detach", "as_strided", "movedim", "moveaxis",
     "swapaxes", "swapdims", "diagonal"}
)  # fmt: skip
_SPLITS = frozenset({"unbind", "split", "chunk", "tensor_split", "hsplit", "vsplit"})  # a tuple of views
_VIEW_ATTRS = frozenset({"T", "mT", "H", "mH", "data", "real", "imag"})
_KEEPS = frozenset({"append", "appendleft", "insert", "extend", "extendleft"})
_DRAINS = frozenset({"clear", "pop", "popleft", "popitem", "remove"})
_BUILTINS = frozenset({"len", "print", "sum", "min", "max", "isinstance", "enumerate", "zip", "range", "str", "sorted"})
_Loop = ast.For | ast.AsyncFor | ast.While
_Node = ast.expr | ast.stmt


@dataclasses.dataclass(frozen=True)
class _Held:
    """A value that keeps a conversion's tensor alive: the tensor or a view of it, or a container holding it."""

    conversion: Conversion
    container: bool


_State = dict[str, _Held]


def _meet(*states: _State | None) -> _State | None:
    """What holds a tensor on every path that goes on (``None``: no path does)."""
    live = [s for s in states if s is not None]
    return {k: v for k, v in live[0].items() if all(k in s for s in live)} if live else None


def _without(state: _State, names: set[str] | str) -> _State:
    names = {names} if isinstance(names, str) else names
    return {k: v for k, v in state.items() if not any(k == n or k.startswith(n + ".") for n in names)}


def _view_index(index: ast.AST) -> bool:
    """Whether indexing a tensor with ``index`` gives a view (a list, mask or comparison copies)."""
    if isinstance(index, ast.Tuple):
        return all(_view_index(e) for e in index.elts)
    return isinstance(index, (ast.Slice, ast.Constant, ast.Name, ast.Attribute, ast.UnaryOp, ast.BinOp))


class _Walk:
    """One loop's body, statement by statement: what holds a conversion's tensor, and where it is kept."""

    def __init__(self, source: Source, arrays: Arrays, loop: _Loop, calls: list[ast.Call]) -> None:
        self.source, self.arrays, self.loop = source, arrays, loop
        self.bound = bound_in(loop)
        nodes = list(loop_nodes(loop))
        self.changing = self.bound | {dotted(n.target) or "" for n in nodes if isinstance(n, ast.AugAssign)}
        self.drained = {receiver(n) for n in nodes if method(n) in _DRAINS}  # batch.clear()
        self.drained |= {base_of(t) for n in nodes if isinstance(n, ast.Delete) for t in n.targets}  # del batch[:]
        cls = next((p.name for p in source.ancestors(loop) if isinstance(p, ast.ClassDef)), "")
        for call in (n for n in nodes if isinstance(n, ast.Call) and method(n) not in _KEEPS):
            name, args = arrays.resolve(call.func) or "", [*call.args, *(k.value for k in call.keywords)]
            if name.split(".")[0] not in ("torch", "numpy", *_BUILTINS):  # flush(batch), helper(self): may empty it
                self.drained |= {dotted(a.value if isinstance(a, ast.Starred) else a) for a in args}
            if name.startswith("self.") and name.count(".") == 1:  # self.flush(): what it names, or all
                func = arrays.functions.get(f"{cls}.{name[5:]}")
                self.drained |= {d for d in map(dotted, walk(func)) if d and "." in d} if func else {"self"}
        self.stores: list[tuple[Conversion, _Node, str]] = []
        found = ((call, arrays.conversion(call, loop, self.bound)) for call in calls)
        self.conversions = {call: conversion for call, conversion in found if conversion is not None}

    def value(self, node: ast.AST | None, state: _State) -> _Held | None:
        """What ``node``'s value holds of a conversion, if anything."""
        if isinstance(node, ast.Call) and node in self.conversions:
            return _Held(self.conversions[node], container=False)
        name = dotted(node)
        if name is not None and name in state:
            return state[name]
        if isinstance(node, (ast.Call, ast.Attribute, ast.Subscript)):
            inner = node.value if not isinstance(node, ast.Call) else getattr(node.func, "value", None)
            held = self.value(inner, state)
            if held is None or held.container:
                return None
            if isinstance(node, ast.Subscript):
                return held if _view_index(node.slice) else None
            if isinstance(node, ast.Attribute):
                return held if node.attr in _VIEW_ATTRS else None
            attr = method(node) or ""
            if attr in _VIEWS or (attr.endswith("_") and not attr.startswith("_")):  # t.div_(255) is t
                return held
            return _Held(held.conversion, container=True) if attr in _SPLITS else None
        if isinstance(node, (ast.Starred, ast.NamedExpr)):
            return self.value(node.value, state)
        parts: list[ast.expr | None] = []
        if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
            parts = list(node.values if isinstance(node, ast.Dict) else node.elts)
        elif isinstance(node, (ast.ListComp, ast.SetComp, ast.GeneratorExp, ast.DictComp)):
            state = _without(state, {name for gen in node.generators for name, _ in bindings(gen)})
            parts = [node.value if isinstance(node, ast.DictComp) else node.elt]
        held = next((h for h in (self.value(p, state) for p in parts) if h is not None), None)
        return None if held is None else _Held(held.conversion, container=True)

    def block(self, body: list[ast.stmt], state: _State | None) -> _State | None:
        """The state after ``body``; ``None`` when it always jumps away (``continue``, ``break``, ``return``)."""
        for node in body:
            state = None if state is None else self.statement(node, dict(state))
        return state

    def statement(self, node: ast.stmt, state: _State) -> _State | None:
        if isinstance(node, (ast.For, ast.AsyncFor, ast.While)):
            self.expression(node.test if isinstance(node, ast.While) else node.iter, state)
            end = self.block(node.body, _without(state, bound_in(node)))
            breaks = any(isinstance(n, ast.Break) for n in loop_nodes(node))  # its own, or an inner loop's: unsure
            return self.block(node.orelse, {} if end is None or breaks else _meet(state, end))
        if isinstance(node, ast.If):
            self.expression(node.test, state)
            return _meet(self.block(node.body, state), self.block(node.orelse, state))
        if isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                self.expression(item.context_expr, state)
            return self.block(node.body, _without(state, {name for item in node.items for name, _ in bindings(item)}))
        if isinstance(node, (ast.Try, getattr(ast, "TryStar", ast.Try))):
            ends = [self.block(node.orelse, self.block(node.body, state))]  # type: ignore[attr-defined]
            ends += [self.block(h.body, _without(state, h.name or "")) for h in node.handlers]  # type: ignore[attr-defined]
            done = _meet(*ends)
            final = self.block(node.finalbody, state if done is None else done)  # type: ignore[attr-defined]
            return None if done is None else final
        if isinstance(node, ast.Match):
            self.expression(node.subject, state)
            captured = [{name for p in walk(case.pattern) for name, _ in bindings(p)} for case in node.cases]
            return _meet(state, *(self.block(c.body, _without(state, captured.pop(0))) for c in node.cases))
        self.expression(node, state)
        if isinstance(node, (ast.Break, ast.Continue, ast.Return, ast.Raise)):
            return None
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            held = self.value(node.value, state)
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                self.bind(target, node.value, held, state)
        elif isinstance(node, ast.AugAssign):
            held, total = self.value(node.value, state), dotted(node.target)
            if held is not None and held.container and total and self.arrays.is_container(self.loop, total):
                self.keep(node.target, held, node, f"`{self.short(node.target)} +=`", state)  # data += [t]
        else:
            names = {getattr(node, "name", "")} if isinstance(node, SCOPES) else {name for name, _ in bindings(node)}
            state = _without(state, names - {""})
        return state

    def expression(self, node: ast.AST, state: _State) -> None:
        """The keeping calls (``data.append(t)``) and ``:=`` bindings of a statement or header."""
        for child in walk_scope(node):
            if isinstance(child, ast.NamedExpr):
                self.bind(child.target, child.value, self.value(child.value, state), state)
            elif isinstance(child, ast.Call) and isinstance(child.func, ast.Attribute) and child.func.attr in _KEEPS:
                args = child.args[1:] if child.func.attr == "insert" else child.args
                held = self.value(args[0], state) if len(args) == 1 else None
                if held is not None:
                    direct = any(n in self.conversions for n in walk(args[0]))
                    self.keep(child.func.value, held, child, f"`{self.short(child.func if direct else child)}`", state)

    def bind(self, target: ast.AST, value: ast.AST | None, held: _Held | None, state: _State) -> None:
        if isinstance(target, (ast.Tuple, ast.List)):
            pairs = value.elts if isinstance(value, (ast.Tuple, ast.List)) else []
            for n, element in enumerate(target.elts):
                part = pairs[n] if len(pairs) == len(target.elts) else None
                self.bind(element, part, self.value(part, state), state)
        elif isinstance(target, (ast.Name, ast.Attribute, ast.Starred)):
            name = dotted(target.value if isinstance(target, ast.Starred) else target)
            for key in [k for k in state if name and (k == name or k.startswith(name + "."))]:
                del state[key]
            if name and held is not None:
                state[name] = held
                for prefix in prefixes(name)[:-1]:
                    if prefix in self.bound:  # sample.x = t, with sample made in the iteration
                        state[prefix] = _Held(held.conversion, container=True)
        elif isinstance(target, ast.Subscript) and held is not None:
            base = base_of(target)
            if base is None or not self.arrays.is_container(self.loop, base):
                return  # a tensor or an array copies what is assigned into it
            keys = [n for s in walk(target) if isinstance(s, ast.Subscript) for n in walk(s.slice)]
            if self.local(base) or any(isinstance(n, ast.Call) or dotted(n) in self.changing for n in keys):
                self.keep(target, held, target, f"`{self.short(target)} = ...`", state)  # by_step[step] = t

    def local(self, base: str) -> bool:
        return bool(set(prefixes(base)) & self.bound)

    def keep(self, container: ast.AST, held: _Held, node: _Node, label: str, state: _State) -> None:
        """``held`` goes into ``container``: kept past the iteration, unless the container is not."""
        base = base_of(container)
        if base is not None and self.local(base):
            for prefix in prefixes(base):
                if prefix in self.bound or prefix == base:
                    state[prefix] = _Held(held.conversion, container=True)
        elif base is not None and not set(prefixes(base)) & self.drained:
            self.stores.append((held.conversion, node, label))

    def short(self, node: ast.AST) -> str:
        text = " ".join(self.source.segment(node).split())
        return text if len(text) <= 60 else text[:57] + "..."


def _loops_around(source: Source, node: ast.AST) -> Iterator[_Loop]:
    """The loops whose iterations run ``node``, in its own scope, innermost first."""
    child = node
    for parent in source.ancestors(node):
        if isinstance(parent, SCOPES):
            return
        if isinstance(parent, LOOPS) and (child in parent.body or child is getattr(parent, "test", None)):
            yield parent
        child = parent


def _kept_once(source: Source, node: ast.AST, loop: ast.AST) -> bool:
    """Whether a ``break``, ``return`` or ``raise`` follows ``node`` in the iteration, so it is kept once."""
    child, nested = node, False
    for parent in source.ancestors(node):
        nested = nested or (isinstance(parent, LOOPS) and parent is not loop)
        stops = (ast.Return, ast.Raise) if nested else (ast.Return, ast.Raise, ast.Break)
        for block in (getattr(parent, field, None) for field in ("body", "orelse", "finalbody")):
            after = block[block.index(child) + 1 :] if isinstance(block, list) and child in block else []
            if any(isinstance(s, stops) for s in after):
                return True
        if parent is loop:
            return False
        child = parent
    return False


class NumpyAlias(LintRule):
    """GG501: ``torch.from_numpy(buf)`` kept across the iterations of a loop that refills ``buf`` in place.

    >>> NumpyAlias.code, NumpyAlias.name
    ('GG501', 'numpy-alias-mutated')
    """

    code = "GG501"
    name = "numpy-alias-mutated"
    hint = "Copy before keeping it: torch.from_numpy(buf.copy()) or torch.tensor(buf)"

    static_form = (
        "`gradguard lint` flags `torch.from_numpy(buf)`, `torch.as_tensor(buf)` and the legacy `torch.Tensor(buf)`, "
        "`torch.FloatTensor(buf)`... (when the array is made with their dtype) on an array made outside a loop and "
        "refilled in place inside it (`buf[:] = x`, `buf += x`, `np.copyto(buf, x)`, `out=buf`, `f.readinto(buf)`, "
        "a function of the same file that fills its argument), when the tensor, a view of it (`t[0]`, `t.view(...)`) "
        "or a tuple, list or dict holding it is kept past the iteration: appended to a list, or stored under a key "
        "that changes. Copies (`buf.copy()`, `.clone()`, `torch.tensor(buf)`), a buffer bound anew on each "
        "iteration, a tensor used within the iteration or overwritten by the next, `.to(...)` and `.float()` (a copy "
        "or not, depending on the values), and lists that a call may empty are not flagged. Left to the run: buffers "
        "filled elsewhere (a library, another thread, another file), tensors kept through calls (`dataset.add(t)`, "
        "a generator that yields them), `t.numpy()` snapshots of parameters, and in-place ops on the tensor."
    )

    def relevant(self, text: str) -> bool:
        if "from_numpy" in text:
            return True
        # as_tensor and the legacy constructors alias only an array the source shows to be numpy's
        return ("as_tensor" in text or "Tensor(" in text) and ("numpy" in text or "np." in text)

    def check(self, source: Source) -> Iterator[Hit]:
        arrays = Arrays(source)
        calls: dict[_Loop, list[ast.Call]] = {}  # the calls that may make an alias, by the loops around them
        for call in arrays.calls:
            name = arrays.resolve(call.func) or ""
            if name in ("torch.from_numpy", "torch.as_tensor") or name.endswith("Tensor"):
                for loop in _loops_around(source, call):
                    calls.setdefault(loop, []).append(call)
        depth = {loop: sum(isinstance(a, LOOPS) for a in source.ancestors(loop)) for loop in calls}
        done: set[ast.Call] = set()
        for loop in sorted(calls, key=lambda loop: -depth[loop]):  # the innermost loop that refills the buffer
            walker = _Walk(source, arrays, loop, calls[loop])
            walker.block(loop.body, {} if walker.conversions else None)
            for conversion, node, label in sorted(walker.stores, key=lambda store: store[1].lineno):
                if conversion.call not in done and not _kept_once(source, node, loop):
                    done.add(conversion.call)
                    yield self._hit(source, loop, conversion, node, label)

    def _hit(self, source: Source, loop: _Loop, conversion: Conversion, node: _Node, label: str) -> Hit:
        call, buf, refills = conversion.call, conversion.buffer, conversion.refills
        text = " ".join(source.segment(call).split())
        text = text if len(text) <= 60 else f"{conversion.how}({buf})"
        which = f"line {refills[0]} refills" if len(refills) == 1 else f"lines {', '.join(map(str, refills[:-1]))}"
        which += f" and {refills[-1]} refill" if len(refills) > 1 else ""
        return Hit(
            call,
            f"`{text}` (line {call.lineno}) shares memory with `{buf}`, which {which} in place in the loop from line "
            f"{loop.lineno}, and the tensor is kept past the iteration ({label}, line {node.lineno}): every kept "
            f"tensor changes to the latest contents of `{buf}`",
            where=buf,
            lines=(loop.lineno, call.lineno, *refills, node.lineno),
            data={"how": conversion.how, "buffer": buf, "refills": list(refills), "kept": node.lineno},
        )
