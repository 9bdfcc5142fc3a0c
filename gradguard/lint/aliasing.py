"""What a loop does to a numpy array: the tensors made from its memory, and where it is refilled in place.

Which calls make a tensor sharing an array's memory (``torch.from_numpy(buf)``,
``torch.as_tensor(buf)``, ``torch.FloatTensor(buf)`` of a float32 array), whether an iteration
binds the array anew, what writes into it (``buf[:] = x``, ``np.copyto(buf, x)``, ``out=buf``,
``f.readinto(buf)``, a same-file function that fills its argument), and what a name is made from.

Example:
    >>> code = "buf = np.zeros(4, np.float32)\\nfor f in fs:\\n    f.readinto(buf)\\n    t = torch.Tensor(buf)\\n"
    >>> src = Source("t.py", code)
    >>> loop = src.tree.body[1]
    >>> Arrays(src).conversion(loop.body[1].value, loop, bound_in(loop))
    Conversion(how='torch.Tensor', buffer='buf', refills=(3,))
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Iterable, Iterator

from gradguard.lint.source import Source
from gradguard.lint.syntax import dotted, method, walk, walk_scope

_LEGACY = {  # the dtype each legacy constructor shares memory with (another is converted: a copy)
    "Tensor": "float32", "FloatTensor": "float32", "DoubleTensor": "float64", "HalfTensor": "float16",
    "LongTensor": "int64", "IntTensor": "int32", "ShortTensor": "int16", "CharTensor": "int8", "ByteTensor": "uint8",
    "BoolTensor": "bool",
}  # fmt: skip
_DTYPES = {spelling: name for name, spellings in {  # numpy's, torch's and builtin spellings, to numpy's
    "float32": ("float32", "f4", "single", "torch.float"), "float64": ("float64", "f8", "double", "float_", "float"),
    "float16": ("float16", "f2", "half"), "int64": ("int64", "i8", "int", "torch.long"),
    "int32": ("int32", "i4", "intc", "torch.int"), "int16": ("int16", "i2", "short"), "int8": ("int8", "i1", "byte"),
    "uint8": ("uint8", "u1", "ubyte"), "bool": ("bool", "bool_", "?"),
}.items() for spelling in spellings}  # fmt: skip
_MAKERS = {"empty": 1, "zeros": 1, "ones": 1, "ndarray": 1, "frombuffer": 1, "full": 2}  # where the dtype goes
_MAKERS_ANY = frozenset({"array", "asarray", "empty_like", "zeros_like", "ones_like", "full_like", "arange"})
_NUMPY_VIEWS = frozenset({"reshape", "view", "transpose", "squeeze", "swapaxes"})
_FILLS = frozenset({"fill", "put", "itemset", "resize", "partition"})  # buf.fill(0): ndarray only
_NUMPY_INTO = frozenset({"copyto", "put", "place", "putmask", "fill_diagonal", "random.shuffle"})  # np.copyto(buf, x)
_INTO = frozenset({"readinto", "readinto1", "recv_into", "recvfrom_into", "shuffle"})  # f.readinto(buf)
_CONTAINERS = frozenset({"list", "dict", "deque", "defaultdict", "OrderedDict"})
_Function = ast.FunctionDef | ast.AsyncFunctionDef


def base_of(node: ast.AST) -> str | None:
    """The dotted name under subscripts: ``buf`` for ``buf[0][:, 1]``, ``d`` for ``d.setdefault(k, [])``.

    >>> base_of(ast.parse("self.hist[k][0]").body[0].value), base_of(ast.parse("f()[0]").body[0].value)
    ('self.hist', None)
    """
    while isinstance(node, ast.Subscript) or method(node) in ("setdefault", "get"):
        node = node.value if isinstance(node, ast.Subscript) else node.func.value  # type: ignore[attr-defined]
    return dotted(node)


def prefixes(name: str) -> list[str]:
    """The objects whose rebinding changes what ``name`` is.

    >>> prefixes("self.data.buf")
    ['self', 'self.data', 'self.data.buf']
    """
    parts = name.split(".")
    return [".".join(parts[:n]) for n in range(1, len(parts) + 1)]


def _targets(target: ast.AST) -> Iterator[str]:
    if isinstance(target, (ast.Name, ast.Attribute)):
        yield dotted(target) or ""
    for element in getattr(target, "elts", [target.value] if isinstance(target, ast.Starred) else []):
        yield from _targets(element)


def bindings(node: ast.AST) -> Iterator[tuple[str, ast.expr | None]]:
    """Each dotted name ``node`` binds (augmented assignments aside), with its value when it is plain.

    >>> [(n, ast.unparse(v) if v else v) for n, v in bindings(ast.parse("a = self.b, c = [], 1").body[0])]
    [('a', '([], 1)'), ('self.b', None), ('c', None)]
    """
    if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
        for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
            whole = isinstance(target, (ast.Name, ast.Attribute))
            yield from ((name, node.value if whole else None) for name in _targets(target))
    elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension, ast.withitem, ast.Delete)):
        targets = [getattr(node, "optional_vars", None) or getattr(node, "target", None), *getattr(node, "targets", ())]
        yield from ((name, None) for target in targets if target for name in _targets(target))
    elif isinstance(node, ast.NamedExpr):
        yield node.target.id, node.value
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
        yield from ((a.asname or a.name.split(".")[0], None) for a in node.names)
    elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
        yield node.name, None


def loop_nodes(loop: ast.AST) -> Iterator[ast.AST]:
    """What runs on every iteration of ``loop``, in its own scope: the body, and a ``while`` loop's test.

    >>> [type(n).__name__ for n in loop_nodes(ast.parse("while ok:\\n    pass").body[0])]
    ['Pass', 'Name', 'Load']
    """
    for root in [*loop.body, *([loop.test] if isinstance(loop, ast.While) else [])]:  # type: ignore[attr-defined]
        yield from walk_scope(root)


def bound_in(loop: ast.AST) -> set[str]:
    """The dotted names an iteration of ``loop`` binds, its target included.

    >>> sorted(bound_in(ast.parse("for i, x in xs:\\n    buf[:] = x\\n    self.t = x").body[0]))
    ['i', 'self.t', 'x']
    """
    return {name for node in [loop, *loop_nodes(loop)] for name, _ in bindings(node)} - {""}


@dataclasses.dataclass(frozen=True)
class Conversion:
    """A call that makes a tensor sharing ``buffer``'s memory, in a loop that refills it at ``refills``."""

    call: ast.Call = dataclasses.field(repr=False)
    how: str
    buffer: str
    refills: tuple[int, ...]


class Arrays:
    """Where the arrays of one source are made, converted and written.

    >>> arrays = Arrays(Source("t.py", "from torch import from_numpy as fn\\ndef f(d):\\n    d[:] = 0\\n"))
    >>> arrays.fills(ast.parse("f(buf)").body[0].value, "buf", None), arrays.resolve(ast.Name("fn"))
    ([False], 'torch.from_numpy')
    """

    def __init__(self, source: Source) -> None:
        self.source = source
        self.names = {"torch": "torch", "np": "numpy", "numpy": "numpy"}  # what torch and numpy are called here
        self.functions: dict[str, _Function | None] = {}  # by name, methods by Class.name
        self.calls: list[ast.Call] = []
        owners: dict[int, str] = {}
        for node in walk(source.tree):
            if isinstance(node, ast.Call):
                self.calls.append(node)
            for alias in node.names if isinstance(node, (ast.Import, ast.ImportFrom)) else ():
                module = (node.module or "") if isinstance(node, ast.ImportFrom) else alias.name
                local = alias.asname or alias.name.split(".")[0]
                full = f"{module}.{alias.name}" if isinstance(node, ast.ImportFrom) else alias.name
                full = full if isinstance(node, ast.ImportFrom) or alias.asname else local
                self.names[local] = full if module.split(".")[0] in ("torch", "numpy") else ""  # jax.numpy as np
            if isinstance(node, ast.ClassDef):
                owners.update((id(item), node.name) for item in node.body)
            if isinstance(node, _Function):
                key = f"{owners[id(node)]}.{node.name}" if id(node) in owners else node.name
                self.functions[key] = None if key in self.functions else node  # defined twice: unknown

    def resolve(self, node: ast.AST | None) -> str | None:
        """The dotted name of a name or attribute chain, ``torch.*`` or ``numpy.*`` as imported, else as written."""
        name = dotted(node)
        head, _, rest = (name or "").partition(".")
        return self.names[head] + ("." + rest if rest else "") if self.names.get(head) else name

    def numpy_call(self, node: ast.AST) -> str:
        """``copyto`` for ``np.copyto(...)``: the numpy function a call calls, else ``""``."""
        name = self.resolve(node.func) if isinstance(node, ast.Call) else None
        return name[6:] if name and name.startswith("numpy.") else ""

    def conversion(self, call: ast.Call, loop: ast.AST, bound: set[str]) -> Conversion | None:
        """``call`` as a tensor sharing the memory of an array that ``loop`` refills without binding it anew."""
        how = self.resolve(call.func) or ""
        legacy = _LEGACY.get(how[6:]) if how.startswith("torch.") else None
        if (how not in ("torch.from_numpy", "torch.as_tensor") and legacy is None) or len(call.args) != 1:
            return None
        if any(k.arg != "dtype" or how != "torch.as_tensor" for k in call.keywords):
            return None  # a device, or an argument the source cannot follow: maybe a copy
        buffer = _array_of(call.args[0])
        refills = None if buffer is None or set(prefixes(buffer)) & bound else self.refills(loop, buffer)
        if not refills or buffer is None:
            return None
        if how != "torch.from_numpy":
            dtype = self.dtype_of(loop, buffer)
            if dtype is None and not any(numpy_only for _, numpy_only in refills):
                return None  # maybe a list, which as_tensor and the legacy constructors copy
            asked = legacy or next((self.dtype_name(k.value) or "?" for k in call.keywords), None)
            if asked is not None and asked != dtype:
                return None  # another dtype is a copy; an unknown one may be
        return Conversion(call, how, buffer, tuple(sorted({node.lineno for node, _ in refills})))  # type: ignore[attr-defined]

    def refills(self, loop: ast.AST, buffer: str) -> list[tuple[ast.AST, bool]] | None:
        """What writes into ``buffer`` each iteration, and whether only an ndarray has it; ``None``: bound anew."""
        found = list(self._writes(loop_nodes(loop), buffer))
        for call in (node for node in loop_nodes(loop) if isinstance(node, ast.Call)):
            writes = self.fills(call, buffer, loop)
            if writes is None:
                return None
            if writes and not any(call is node for node, _ in found):
                found.append((call, any(writes)))
        return found

    def _writes(self, nodes: Iterable[ast.AST], buffer: str) -> Iterator[tuple[ast.AST, bool]]:
        for node in nodes:
            targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
            if any(isinstance(t, ast.Subscript) and base_of(t) == buffer for t in targets) or (
                isinstance(node, ast.AugAssign) and base_of(node.target) == buffer
            ):
                yield node, False  # buf[:] = x, buf += x
            if not isinstance(node, ast.Call):
                continue
            into = bool(node.args) and base_of(node.args[0]) == buffer  # f(buf, ...)
            on = isinstance(node.func, ast.Attribute) and base_of(node.func.value) == buffer  # buf.f(...)
            out = any(k.arg == "out" and base_of(k.value) == buffer for k in node.keywords)
            if out or (into and self.numpy_call(node) in _NUMPY_INTO) or (on and method(node) in _FILLS):
                yield node, True
            elif (into and not self.numpy_call(node) and method(node) in _INTO) or (on and method(node) == "sort"):
                yield node, False  # bytearray.readinto, list.sort: not an ndarray only

    def fills(self, call: ast.Call, buffer: str, at: ast.AST | None) -> list[bool] | None:
        """How a same-file function that ``call`` calls writes into ``buffer``: whether only an ndarray has each write.

        ``buffer`` is passed as an argument, or is ``self.x`` and ``call`` a method of ``self`` (``at`` is in
        its class); ``None`` when that method binds ``self.x`` anew.
        """
        cls = next((p.name for p in self.source.ancestors(at or call) if isinstance(p, ast.ClassDef)), "")
        skip = int(isinstance(call.func, ast.Attribute) and dotted(call.func.value) == "self")
        func = self.functions.get(f"{cls}.{method(call)}" if skip else dotted(call.func) or "")
        if func is None:
            return []
        params = [a.arg for a in [*func.args.posonlyargs, *func.args.args]]
        inner = [k.arg for k in call.keywords if k.arg and dotted(k.value) == buffer]
        for n, arg in enumerate(call.args[: max(len(params) - skip, 0)]):
            if isinstance(arg, ast.Starred):
                break
            inner += [params[n + skip]] if dotted(arg) == buffer else []
        own = params[0] + buffer[4:] if skip and params and buffer.startswith("self.") else ""
        bound = {name for node in walk_scope(func) if node is not func for name, _ in bindings(node)}
        if own in bound:
            return None
        writes = [name for name in [*inner, own] if name and not set(prefixes(name)) & bound]
        return [only for name in writes for _, only in self._writes(walk_scope(func), name)]

    def made_from(self, at: ast.AST, name: str) -> list[ast.expr] | None:
        """Every value ``name`` is assigned in its scope (the class for ``self.x``); ``None`` if bound otherwise."""
        scope = self.source.scope_of(at)
        nodes: Iterable[ast.AST] = walk_scope(scope)
        if name.startswith("self."):
            nodes = walk(next((p for p in self.source.ancestors(at) if isinstance(p, ast.ClassDef)), ast.Pass()))
        elif isinstance(scope, _Function) and name in {a.arg for a in walk(scope.args) if isinstance(a, ast.arg)}:
            return None
        values: list[ast.expr] = []
        for bound, value in (pair for node in nodes for pair in bindings(node)):
            if bound == name and value is None:
                return None
            values += [value] if bound == name and value is not None else []
        return values or None

    def dtype_name(self, node: ast.AST | None) -> str | None:
        """The dtype a numpy, torch or builtin dtype expression names, spelled as numpy does (``int64``)."""
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return _DTYPES.get(node.value)
        head, _, last = (self.resolve(node) or "").rpartition(".")
        if head == "torch":
            return _DTYPES.get(f"torch.{last}", _DTYPES.get(last))
        return _DTYPES.get(last) if head == "numpy" or (last in ("float", "int", "bool") and not head) else None

    def dtype_of(self, at: ast.AST, name: str) -> str | None:
        """The dtype of the numpy array ``name`` is made as (``"?"``: an array, dtype unknown), else ``None``."""
        found: set[str] = set()
        for value in self.made_from(at, name) or [ast.Constant(None)]:
            kind = self.numpy_call(value)
            if not isinstance(value, ast.Call) or (kind not in _MAKERS and kind not in _MAKERS_ANY):
                return None
            spelled = next((k.value for k in value.keywords if k.arg == "dtype"), None)
            slot = _MAKERS.get(kind, 0)
            if spelled is None and 0 < slot < len(value.args):
                spelled = value.args[slot]
            default = "float64" if slot and kind != "full" else "?"  # np.full: the fill value's
            found.add(default if spelled is None else self.dtype_name(spelled) or "?")
        return found.pop() if len(found) == 1 else "?"

    def is_container(self, at: ast.AST, name: str) -> bool:
        """Whether every value ``name`` is assigned is a list or a dict (a literal, comprehension or call)."""
        return all(_is_container(v) for v in self.made_from(at, name) or [ast.Constant(None)])


def _array_of(node: ast.AST) -> str | None:
    """The array ``node`` views: ``buf`` for ``buf``, ``buf[:n]``, ``buf[0, :]``, ``buf.T``, not ``bufs[i]``."""
    while True:
        if isinstance(node, ast.Subscript) and isinstance(node.slice, (ast.Slice, ast.Tuple)):
            node = node.value  # a list takes no tuple index, and its slice is not an array
        elif isinstance(node, ast.Attribute) and node.attr == "T":
            node = node.value
        elif isinstance(node, ast.Call) and method(node) in _NUMPY_VIEWS:
            node = node.func.value  # type: ignore[attr-defined]
        else:
            return dotted(node)


def _is_container(node: ast.expr) -> bool:
    if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Mult):
        node = node.left if isinstance(node.left, ast.List) else node.right  # [None] * n
    called = (dotted(node.func) or "").rpartition(".")[2] if isinstance(node, ast.Call) else ""
    return called in _CONTAINERS or isinstance(node, (ast.List, ast.Dict, ast.ListComp, ast.DictComp))
