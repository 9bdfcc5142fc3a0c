"""GG403 param-not-in-optimizer, static form: a layer put into a model after its optimizer was built."""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Iterator
from typing import NamedTuple

from gradguard.lint.rule import Hit, LintRule
from gradguard.lint.source import Source
from gradguard.lint.syntax import LOOPS, SCOPES, dotted, method, walk, walk_scope

Path = tuple[str, ...]  # ("model", ".classifier", "[6]") for model.classifier[6]

#: ``torch.nn`` classes with trainable parameters (normalisations: see ``_AFFINE``).
_LAYERS = re.compile(
    r"(Lazy)?(Linear|Conv(Transpose)?[123]d|(Batch|Instance)Norm[123]d)|Bilinear|SyncBatchNorm|GroupNorm|LayerNorm"
    r"|RMSNorm|Embedding(Bag)?|(RNN|LSTM|GRU)(Cell)?|MultiheadAttention|Transformer(Encoder|Decoder)?(Layer)?|PReLU"
)
#: Normalisations' weight switch: its keyword, position, and the values it has weights with (``None``: not given).
_AFFINE = {"InstanceNorm": ("affine", 3, (True,)), "LayerNorm": ("elementwise_affine", 2, (None, True)),
           "RMSNorm": ("elementwise_affine", 2, (None, True)), "Norm": ("affine", 3, (None, True))}  # fmt: skip
_CONTAINERS = frozenset({"Sequential", "ModuleList", "ModuleDict", "ParameterList", "ParameterDict"})
_at = operator.attrgetter("lineno", "col_offset")  # a node's place, to compare in source order
#: Methods that give back the module they are called on (``nn.Linear(2, 2).to(device)``).
_SAME = frozenset({"to", "cuda", "cpu", "float", "half", "double", "bfloat16", "train", "eval", "requires_grad_"})
#: Imported classes named like these own no layer parameters.
_NOT_LAYER = re.compile(
    r"(Config\w*|Tokenizer\w*|Processor|Extractor|Transforms?|Compose|Normalize|Loss|Identity|Dropout\w*|Pool\w*|Flatten"
    r"|Softmax|Metrics?|Arg\w*|Namespace|Dataset|Loader|Sampler|Scheduler|Optimizer|Scaler|Writer|Logger|Callback)$"
)
#: Words a source that builds an optimizer contains.
_OPTIMIZER_WORDS = (
    "optim",
    "Optim",
    "SGD",
    "Adam",
    "RMSprop",
    "Adagrad",
    "Adadelta",
    "LBFGS",
    "Lion",
    "Adafactor",
    "LAMB",
)
_OPTIMIZERS = re.compile(r"SGD|Adam\w*|RMSprop|Adagrad|Adadelta|NAdam|RAdam|LBFGS|Lion|Adafactor|LAMB|Lamb")
_THROUGH = (ast.List, ast.Tuple, ast.Set, ast.ListComp, ast.GeneratorExp, ast.comprehension, ast.BinOp, ast.Starred)
_ADDERS = frozenset({"add_module", "register_module", "register_parameter", "setattr", "append"})


def _path(node: ast.AST | None) -> Path | None:
    if isinstance(node, ast.Name):
        return (node.id,)
    if not isinstance(node, (ast.Attribute, ast.Subscript)) or (head := _path(node.value)) is None:
        return None
    return (*head, f".{node.attr}" if isinstance(node, ast.Attribute) else f"[{ast.unparse(node.slice)}]")


def _overlap(a: Path | None, b: Path) -> bool:
    return a is not None and (a[: len(b)] == b or b[: len(a)] == a)


def _sources(node: ast.AST | None) -> list[tuple[Path, str]]:
    """``(model, "parameters")`` for each ``model.parameters()`` that a ``params`` argument is made of."""
    parts: list[ast.AST] = []
    if isinstance(node, ast.Call):
        name = method(node)
        if name in ("parameters", "named_parameters") and isinstance(node.func, ast.Attribute):
            found = _path(node.func.value)
            return [] if found is None else [(found, name)]
        parts = [*node.args] if name in ("list", "tuple", "filter", "chain", "sorted", "set") else []
    elif isinstance(node, ast.Dict):  # a param group
        parts = [v for k, v in zip(node.keys, node.values, strict=True) if getattr(k, "value", None) == "params"]
    elif isinstance(node, _THROUGH):
        parts = list(ast.iter_child_nodes(node))
    return [s for part in parts for s in _sources(part)]


def _flag(call: ast.Call, name: str, index: int) -> object:
    """A boolean argument's constant (by keyword or position): ``None`` when absent, ``...`` when not constant."""
    given = {k.arg: k.value for k in call.keywords}.get(name, call.args[index] if len(call.args) > index else None)
    return given.value if isinstance(given, ast.Constant) else ... if given is not None else None


def _mentions(node: ast.AST) -> Iterator[Path]:
    """The objects an expression names, outermost: ``model`` in ``SGD(model.parameters())``."""
    found = _path(node)
    if found is not None:
        yield found
        return
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        node = ast.Tuple([node.func.value, *node.args, *(k.value for k in node.keywords)])  # not the method's name
    for part in ast.iter_child_nodes(node):
        yield from _mentions(part)


class _Optimizer(NamedTuple):
    call: ast.Call
    held: Path | None  # where it is kept: ("opt",), ("self", ".opt"); None when not kept
    sources: list[tuple[Path, str]]


class _Insertion(NamedTuple):
    node: ast.AST  # the target assigned, or the call that adds
    statement: ast.AST
    path: Path
    value: ast.AST
    adds: bool  # add_module, register_*, append: adds rather than replaces


class _Program:
    """What a file imports and defines, to tell a call that builds trainable parameters."""

    def __init__(self, tree: ast.Module) -> None:
        self.imports: dict[str, str] = {}
        self.classes = {node.name: node for node in walk(tree) if isinstance(node, ast.ClassDef)}
        self._layers: dict[str, bool] = {}
        for node in walk(tree):
            if isinstance(node, ast.Import):
                self.imports.update((a.asname or a.name.split(".")[0], a.name if a.asname else "") for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = "." * node.level + (node.module or "")
                self.imports.update((a.asname or a.name, f"{base}.{a.name}") for a in node.names)

    def qualified(self, func: ast.AST) -> str:  # torch.nn.Linear for nn.Linear (nn: torch.nn unless imported)
        head, _, rest = (dotted(func) or "").partition(".")
        full = self.imports.get(head) or ("torch.nn" if head == "nn" else head)
        return f"{full}.{rest}" if rest else full

    def creates(self, value: ast.AST) -> str | None:
        """``"layer"``/``"parameter"`` when ``value`` visibly builds trainable parameters, else ``None``."""
        while isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and value.func.attr in _SAME:
            if value.func.attr == "requires_grad_" and _flag(value, "requires_grad", 0) not in (None, True):
                return None
            value = value.func.value
        if not isinstance(value, ast.Call):
            return None
        last = (full := self.qualified(value.func)).rpartition(".")[2]
        if full.startswith("torch.nn."):
            if last == "Parameter":
                return "parameter" if _flag(value, "requires_grad", 1) in (None, True) else None
            if last in _CONTAINERS:
                inner = (c for arg in (*value.args, *value.keywords) for c in walk(arg) if isinstance(c, ast.Call))
                return "layer" if any(self.creates(c) for c in inner) else None
            name, index, weights = next((v for k, v in _AFFINE.items() if k in last), ("", 9, (None,)))
            return "layer" if _LAYERS.fullmatch(last) and _flag(value, name, index) in weights else None
        if not last[:1].isupper() or full.startswith("torch."):
            return None  # a factory (timm.create_model), or torch's own (torch.Generator)
        if full in self.classes:
            return "layer" if self._local_layer(full) else None
        imported = (dotted(value.func) or "").split(".")[0] in self.imports
        return "layer" if imported and not _NOT_LAYER.search(last) else None

    def _local_layer(self, name: str) -> bool:
        """Whether a class of the file is a module that owns parameters (made in its body, or inherited)."""
        if name in self.classes and name not in self._layers:
            self._layers[name] = False  # while deciding: a class that builds itself decides nothing
            cls, bases = self.classes[name], [self.qualified(b) for b in self.classes[name].bases]
            inherited = any(_LAYERS.fullmatch(b.removeprefix("torch.nn.")) or self._local_layer(b) for b in bases)
            made = bool(bases) and any(self.creates(c) for c in walk(cls) if isinstance(c, ast.Call))
            self._layers[name] = inherited or made
        return self._layers.get(name, False)

    def optimizer(self, call: ast.Call) -> list[tuple[Path, str]]:
        """What an optimizer call (named with ``optim`` or after a known optimizer) is built from; ``[]``: none."""
        last = (full := self.qualified(call.func)).rpartition(".")[2]
        if ("optim" not in full.lower() and not _OPTIMIZERS.fullmatch(last)) or last in ("add_param_group", "step"):
            return []
        return _sources(next((k.value for k in call.keywords if k.arg == "params"), next(iter(call.args), None)))


class ParamNotInOptimizer(LintRule):
    """A new layer or parameter put into a model after an optimizer was built from its parameters.

    >>> text = "opt = torch.optim.SGD(model.parameters())\\nmodel.fc = nn.Linear(8, 2)\\nopt.step()\\n"
    >>> [(h.where, h.node.lineno, h.lines) for h in ParamNotInOptimizer().check(Source("t.py", text))]
    [('model.fc', 2, (1, 3))]
    """

    code = "GG403"
    name = "param-not-in-optimizer"
    hint = (
        "Build the optimizer after replacing layers, or add the new parameters with "
        "optimizer.add_param_group({'params': ...})"
    )

    static_form = (
        "`gradguard lint` flags, in one function or at the top level, an optimizer built over `model.parameters()` "
        "(lists, filters, param groups too) and then a new layer or parameter put into that model: `model.fc = "
        "nn.Linear(...)`, `model.classifier[6] = ...`, `model.fc.weight = nn.Parameter(...)`, `setattr`, `add_module`, "
        "`register_parameter`, `append`, when the value visibly has trainable parameters (a `torch.nn` layer with "
        "weights, a trainable `nn.Parameter`, a class of the file that makes some, an imported class). Not flagged: "
        "an optimizer built again, `add_param_group` or a freeze afterwards; the model or optimizer rebound in "
        "between; an optimizer unused afterwards. Factories and optimizers built elsewhere are left to the run."
    )

    def relevant(self, text: str) -> bool:
        return "parameters(" in text and any(word in text for word in _OPTIMIZER_WORDS)

    def check(self, source: Source) -> Iterator[Hit]:
        """One hit per insertion after an optimizer over the same model, at the insertion."""
        program = _Program(source.tree)
        for scope in walk(source.tree):
            if isinstance(scope, ast.Module) or (isinstance(scope, SCOPES) and "parameters" in source.segment(scope)):
                yield from _Scope(source, program, scope).hits()


class _Scope:
    """The optimizers and insertions of one function (or of the module's top level), in source order."""

    def __init__(self, source: Source, program: _Program, scope: ast.AST) -> None:
        self.source, self.program, self.scope = source, program, scope
        self.nodes = sorted((n for n in walk_scope(scope) if hasattr(n, "lineno")), key=_at)
        self.optimizers, self.insertions = list[_Optimizer](), list[_Insertion]()
        for node in self.nodes:
            if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    self._assign(node, target, node.value)
            elif isinstance(node, ast.Call) and method(node) in _ADDERS:
                self._add(node, method(node), [*node.args, *(k.value for k in node.keywords)])

    def _assign(self, statement: ast.AST, target: ast.AST, value: ast.AST) -> None:
        if isinstance(target, (ast.Tuple, ast.List)):
            if isinstance(value, (ast.Tuple, ast.List)) and len(value.elts) == len(target.elts):
                for pair in zip(target.elts, value.elts, strict=True):
                    self._assign(statement, *pair)
            return
        held = _path(target)
        built = [(c, s) for c in walk(value) if isinstance(c, ast.Call) for s in [self.program.optimizer(c)] if s]
        if built:
            self.optimizers.append(_Optimizer(built[0][0], held, built[0][1]))
        elif held is not None and len(held) > 1:
            self.insertions.append(_Insertion(target, statement, held, value, adds=False))

    def _add(self, call: ast.Call, name: str | None, args: list[ast.expr]) -> None:
        """Insertions by call: ``setattr(m, "fc", v)``, ``m.add_module("fc", v)``, ``m.blocks.append(v)``..."""
        setter = name == "setattr" and bool(args)  # setattr(m, "fc", v): m is an argument
        receiver = _path(args[0] if setter else getattr(call.func, "value", None))
        args = args[1:] if setter else args
        if receiver is not None and len(args) == (1 if name == "append" else 2):
            key = getattr(args[0], "value", None)  # the name given, when a literal
            part = "[-1]" if name == "append" else f".{key}" if isinstance(key, str) else f".<{ast.unparse(args[0])}>"
            self.insertions.append(_Insertion(call, call, (*receiver, part), args[-1], name != "setattr"))

    def hits(self) -> Iterator[Hit]:
        for insertion in self.insertions:
            kind = self.program.creates(insertion.value)
            for opt in reversed([o for o in self.optimizers if kind and _at(o.call) < _at(insertion.node)]):
                model = next((s for s in opt.sources if _overlap(s[0], insertion.path)), None)
                if model is not None and self._used_after(opt, insertion) and self._stale(opt, model[0], insertion):
                    yield self._hit(insertion, kind or "", opt, *model)
                    break

    def _stale(self, opt: _Optimizer, model: Path, insertion: _Insertion) -> bool:
        """Whether ``opt`` (over ``model``) never gets the new parameters of ``insertion``."""
        start, at, path = _at(opt.call), _at(insertion.node), insertion.path
        for node in (n for n in self.nodes if _at(n) > start):
            found = _path(node) if isinstance(getattr(node, "ctx", None), ast.Store) else None
            if _at(node) < at and found and any(p[: len(found)] == found for p in (model, opt.held) if p):
                return False  # another model, or another optimizer, from here on
            if _at(node) > at and ((found is not None and found == opt.held) or self._covers(node, path)):
                return False  # the optimizer built again, the new parameters given to it, or the new layer frozen
        return True

    def _covers(self, node: ast.AST, path: Path) -> bool:
        """Whether a node builds an optimizer over ``path``, adds its parameters, or freezes them."""
        if isinstance(node, ast.For):
            return any(_overlap(s, path) for s, _ in _sources(node.iter)) and any(map(_freezes, walk(node)))
        mentioned = isinstance(node, (ast.Call, ast.Assign)) and any(_overlap(m, path) for m in _mentions(node))
        if isinstance(node, ast.Call) and method(node) == "add_param_group":
            return mentioned or not _sources(next(iter(node.args), None))  # what it adds is unknown
        name = (dotted(getattr(node, "func", None)) or "").lower()
        return mentioned and ("optim" in name or "freeze" in name or _freezes(node))

    def _used_after(self, opt: _Optimizer, insertion: _Insertion) -> bool:
        """Whether the optimizer is used after the insertion: later, in a loop around it, or kept on an object."""
        if opt.held is None or len(opt.held) > 1:
            return opt.held is not None
        around = {a for a in self.source.ancestors(insertion.node) if isinstance(a, LOOPS)}
        loops = around.difference(self.source.ancestors(opt.call))  # loops that run the insertion again, not the build
        for name in walk(self.scope):
            if isinstance(name, ast.Name) and name.id == opt.held[0] and isinstance(name.ctx, ast.Load):
                inner = self.source.scope_of(name) is not self.scope  # a function that may run later
                if _at(name) > _at(insertion.node) or inner or loops.intersection(self.source.ancestors(name)):
                    return True
        return False

    def _hit(self, insertion: _Insertion, kind: str, opt: _Optimizer, model: Path, how: str) -> Hit:
        where, held, line = "".join(insertion.path), "".join(model), insertion.node.lineno  # type: ignore[attr-defined]
        what = f"replaces {where}"  # the very layer (or one that holds) the optimizer was built from
        if model == insertion.path[: len(model)] and model != insertion.path:
            what = f"adds a {kind} to {held}" if insertion.adds else f"replaces a {kind} of {held}"
        name = "".join(opt.held or ())
        new = "layer's parameters are" if kind == "layer" else "parameter is"
        shown = " ".join(self.source.segment(insertion.statement).split()).replace("( ", "(").replace(", )", ")")
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        message = (
            f"`{shown}` (line {line}) {what} after `{name}` was built from {held}.{how}() (line "
            f"{opt.call.lineno}): the new {new} not in the optimizer and never train{'s' if kind != 'layer' else ''}"
        )
        steps = [_at(c) for c in walk(self.scope) if method(c) == "step" and opt.held in [*_mentions(c)]]
        step = min(steps, key=lambda at: (at < _at(insertion.node), at), default=(line, 0))[0]  # the next one
        lines = tuple(sorted({opt.call.lineno, step} - {line}))
        data = {"optimizer": name, "model": held, "optimizer_line": opt.call.lineno, "kind": kind}
        return Hit(insertion.node, message, where=where, lines=lines, data=data)


def _freezes(node: ast.AST) -> bool:
    """``x.requires_grad = False`` or ``x.requires_grad_(False)``."""
    if isinstance(node, ast.Call):
        return method(node) == "requires_grad_" and _flag(node, "requires_grad", 0) is False
    targets = node.targets if isinstance(node, ast.Assign) and getattr(node.value, "value", None) is False else []
    return any(getattr(t, "attr", None) == "requires_grad" for t in targets)
