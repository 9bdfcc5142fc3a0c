"""GG401 requires-grad-typo, static form: an assignment to a misspelt ``requires_grad``.

Example:
    >>> from gradguard.lint.source import Source
    >>> hit = next(iter(RequiresGradTypo().check(Source("t.py", "p.requres_grad = False\\n"))))
    >>> hit.where, hit.fix.title
    ('p', 'Rename requres_grad to requires_grad')
"""

from __future__ import annotations

import ast
import dataclasses
import re
from collections.abc import Iterable, Iterator

from gradguard.lint.rule import Hit, LintRule
from gradguard.lint.source import Edit, Fix, Source
from gradguard.lint.syntax import dotted, method, walk, walk_scope
from gradguard.spelling import TARGET, is_near_miss, mentions_near_miss

#: Comparisons that always give a bool, whatever their operands (``==`` on tensors gives a tensor).
_BOOL_COMPARISONS = (ast.Is, ast.IsNot, ast.In, ast.NotIn)
#: Receivers whose attributes are the program's own design (``self.require_grad = flag`` in a class).
_OWN = frozenset({"self", "cls"})
_QUOTED = re.compile(r"""[rRuU]?(['"])(\w+)\1""")
_SPACES = re.compile(r"\s+")
#: Calls that make a leaf tensor, whose flag may be set (on a computed tensor, setting it raises).
_LEAVES = frozenset(
    {"zeros", "ones", "empty", "full", "rand", "randn", "randint", "arange", "linspace", "eye", "tensor", "as_tensor",
     "from_numpy", "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like", "Parameter"}
)  # fmt: skip
#: Methods that keep a tensor that requires no gradient a leaf.
_KEEP = frozenset({"float", "double", "half", "bfloat16", "long", "int", "to", "cuda", "cpu", "contiguous", "detach"})
_OPS = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.BitOr: "|", ast.BitAnd: "&", ast.BitXor: "^"}


def is_bool(value: ast.AST | None) -> bool:
    """Whether an expression always gives a bool: ``True``/``False``, ``not x``, ``a is b``, ``k in d``, ``bool(x)``.

    >>> [is_bool(ast.parse(s, mode="eval").body) for s in ("False", "not frozen", "k in names", "epoch > 3", "flag")]
    [True, True, True, False, False]
    """
    if isinstance(value, ast.Constant):
        return isinstance(value.value, bool)
    if isinstance(value, ast.UnaryOp):
        return isinstance(value.op, ast.Not)
    if isinstance(value, ast.Compare):
        return all(isinstance(op, _BOOL_COMPARISONS) for op in value.ops)
    return isinstance(value, ast.Call) and dotted(value.func) == "bool" and len(value.args) == 1 and not value.keywords


def binding(source: Source, receiver: ast.expr, at: ast.AST) -> ast.AST | None:
    """Where ``receiver``, a name, was last bound before ``at`` in its scope (an assignment, a ``for``...).

    >>> src = Source("t.py", "for p in ps:\\n    out = net(x)\\n    p.requres_grad = out.requres_grad = False")
    >>> at = src.tree.body[0].body[1]
    >>> [type(binding(src, ast.Name(n), at)).__name__ for n in ("p", "out", "ps")]
    ['For', 'Assign', 'NoneType']
    """
    if not isinstance(receiver, ast.Name):
        return None
    place = (at.lineno, at.col_offset)  # type: ignore[attr-defined]
    stores = [n for n in walk_scope(source.scope_of(at)) if isinstance(n, ast.Name) and n.id == receiver.id
              and isinstance(n.ctx, ast.Store) and (n.lineno, n.col_offset) < place]  # fmt: skip
    found = source.parent(max(stores, key=lambda n: (n.lineno, n.col_offset))) if stores else None
    while isinstance(found, (ast.Tuple, ast.List, ast.Starred)):
        found = source.parent(found)
    return found


def computed(bound: ast.AST | None) -> bool:
    """Whether a name so bound may hold a tensor autograd computed: setting its flag would raise.

    Renaming the misspelt attribute of such a tensor could turn a silent no-op into an error.
    Factories (``torch.zeros``), parameters, detached tensors, loop variables and names bound
    elsewhere are taken as leaves.

    >>> [computed(ast.parse(s).body[0]) for s in ("out = net(x)", "pe = torch.zeros(3).cuda()", "x += 1", "x = y")]
    [True, False, True, False]
    """
    if isinstance(bound, ast.AugAssign):
        return True
    value = bound.value if isinstance(bound, (ast.Assign, ast.AnnAssign, ast.NamedExpr)) else None
    return isinstance(value, (ast.Call, ast.BinOp, ast.UnaryOp, ast.Subscript, ast.IfExp)) and not _leaf(value)


def _leaf(value: ast.expr) -> bool:
    """A factory's tensor (``torch.zeros(3).float()``), a new parameter or a detached tensor: a leaf."""
    chained = False
    while isinstance(value, ast.Call) and isinstance(value.func, ast.Attribute) and value.func.attr in _KEEP:
        if value.func.attr == "detach":
            return True
        value, chained = value.func.value, True
    if not isinstance(value, ast.Call) or method(value) not in _LEAVES:
        return False
    grad = method(value) == "Parameter" or any(k.arg == "requires_grad" for k in value.keywords)
    return not (chained and grad)  # .to() of a tensor that requires gradients is computed


def user_attributes(tree: ast.AST) -> set[str]:
    """Attribute names the file itself reads or declares: the program's own attributes, never a typo.

    Reads are ``x.name`` loaded and ``getattr``/``hasattr``/``delattr`` with a literal name;
    declarations are the names a class body defines (fields, properties, methods) and
    ``__slots__`` entries. Reading ``requires_grad_`` calls the method, and does not count.

    >>> sorted(user_attributes(ast.parse("class C:\\n    require_grad: bool = True\\nif a.requiresgrad: pass")))
    ['require_grad', 'requiresgrad']
    """
    names: set[str] = set()
    for node in walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
            names.add(node.attr)
        elif isinstance(node, ast.Call) and dotted(node.func) in ("getattr", "hasattr", "delattr"):
            names.update(_literals(node.args[1:2]))
        elif isinstance(node, ast.ClassDef):
            for stmt in node.body:
                if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(stmt.name)
                elif isinstance(stmt, (ast.Assign, ast.AnnAssign)):
                    targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target]
                    bare = {n.id for t in targets for n in walk(t) if isinstance(n, ast.Name)}
                    names |= bare
                    if "__slots__" in bare and stmt.value is not None:
                        names.update(_literals(walk(stmt.value)))
    names.discard(f"{TARGET}_")
    return names


def _literals(nodes: Iterable[ast.AST]) -> Iterator[str]:
    for node in nodes:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.value


def _pairs(target: ast.expr, value: ast.expr | None) -> Iterator[tuple[ast.expr, ast.expr | None]]:
    """Each simple target with the value it receives (``None`` when unpacked from an unknown value)."""
    if not isinstance(target, (ast.Tuple, ast.List)):
        yield target, value
        return
    items = value.elts if isinstance(value, (ast.Tuple, ast.List)) else []
    starred = any(isinstance(e, ast.Starred) for e in (*target.elts, *items))
    for i, element in enumerate(target.elts):
        known = items[i] if len(items) == len(target.elts) and not starred else None
        yield from _pairs(element.value if isinstance(element, ast.Starred) else element, known)


@dataclasses.dataclass(frozen=True)
class Site:
    """One store of an attribute: ``receiver.attr = value`` (``how``: ``=``, ``+=``..., or ``setattr``).

    ``node`` is the :class:`ast.Attribute` stored to, or the quoted name given to ``setattr``;
    ``value`` is what the attribute receives, ``None`` when that is unknown.

    >>> [(s.attr, s.how) for s in sites(ast.parse("a.x = b.y = 1; c.z += 2; setattr(d, 'w', 3)"))]
    [('x', '='), ('y', '='), ('z', '+='), ('w', 'setattr')]
    """

    statement: ast.AST
    receiver: ast.expr
    attr: str
    value: ast.expr | None
    node: ast.expr
    how: str


def sites(tree: ast.AST) -> Iterator[Site]:
    """Every attribute store with a known name under ``tree``, in source order."""
    found: list[Site] = []
    for node in walk(tree):
        if isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for top in targets:
                for target, value in _pairs(top, node.value):
                    if isinstance(target, ast.Attribute):
                        found.append(Site(node, target.value, target.attr, value, target, "="))
        elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Attribute):
            how = _OPS.get(type(node.op), "?") + "="
            found.append(Site(node, node.target.value, node.target.attr, node.value, node.target, how))
        elif isinstance(node, ast.Call) and dotted(node.func) == "setattr" and len(node.args) == 3:
            name = node.args[1]
            if isinstance(name, ast.Constant) and isinstance(name.value, str) and not node.keywords:
                found.append(Site(node, node.args[0], name.value, node.args[2], name, "setattr"))
    found.sort(key=lambda s: (s.node.lineno, s.node.col_offset))
    yield from found


def _compact(source: Source, node: ast.AST, limit: int = 40) -> str:
    text = _SPACES.sub(" ", source.segment(node)).strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RequiresGradTypo(LintRule):
    """An assignment to a misspelling of ``requires_grad``, renamed by a safe fix where the rename cannot raise.

    >>> [(h.where, h.fix is not None) for h in RequiresGradTypo().check(Source("t.py", "w.require_grad = flag\\n"))]
    [('w', False)]
    """

    code = "GG401"
    name = "requires-grad-typo"
    hint = "Spell it requires_grad, or call module.requires_grad_(False) / p.requires_grad_(False)"
    static_form = (
        "`gradguard lint` flags every assignment, anywhere in the file, of an attribute whose name is a near "
        "miss of `requires_grad` by the same measure as the run (within two edits, ignoring case and "
        "underscores, and `requires_grad_`, the method's name): `p.requres_grad = False`, "
        "`layer.weight.require_grad = False`, annotated, chained, unpacked and augmented assignments, and "
        '`setattr(p, "requres_grad", False)` with a literal name. Its safe fix renames the attribute to '
        "`requires_grad` when the value is always a bool (`True`, `False`, `not x`, `x is y`, `k in s`) and the "
        "object is not a tensor the function computed (`out = model(x)`): another value, or the flag of a "
        "computed tensor, could make the real attribute raise, so those are left to you. Reads "
        "(`if p.requres_grad:` raises at run time), keyword arguments, `self.<name> = ...` and names that the "
        "file also reads or declares in a class (an attribute of the program's own) are not flagged. Whether the "
        "object is a parameter, and which parameters stayed trainable, is left to the run."
    )

    def relevant(self, text: str) -> bool:
        return mentions_near_miss(text)

    def check(self, source: Source) -> Iterator[Hit]:
        """Each misspelt store, at its attribute (or at the quoted name given to ``setattr``)."""
        own: set[str] | None = None
        for site in sites(source.tree):
            if not is_near_miss(site.attr) or dotted(site.receiver) in _OWN:
                continue
            if own is None:
                own = user_attributes(source.tree)
            if site.attr not in own:
                yield self._hit(source, site)

    def _hit(self, source: Source, site: Site) -> Hit:
        where = dotted(site.receiver) or _compact(source, site.receiver)
        value = _compact(source, site.value) if site.value is not None else None
        if site.how == "setattr":
            shown = f'setattr({where}, "{site.attr}", {value})'
        else:
            shown = (
                f"{where}.{site.attr} {site.how} {value}" if value is not None else _compact(source, site.statement, 60)
            )
        if site.attr == f"{TARGET}_":
            why = f"`{site.attr}` is the method, not the flag `{TARGET}`"
        else:
            why = f"`{site.attr}` is a misspelling of `{TARGET}`"
        plain = site.how in ("=", "setattr") and isinstance(site.value, ast.Constant)
        constant = site.value.value if plain else None  # type: ignore[union-attr]
        bound = binding(source, site.receiver, site.node)
        if constant is False and not isinstance(bound, (ast.Assign, ast.AnnAssign, ast.NamedExpr, ast.AugAssign)):
            then = f"{where} keeps training"
        elif constant is True:
            then = f"{where} is not made trainable"
        else:
            then = f"{where}.{TARGET} stays as it was"
        message = f"`{shown}` sets a new attribute that nothing reads: {why}, so {then}"
        line = site.node.lineno
        statement_line = site.statement.lineno  # type: ignore[attr-defined]
        return Hit(
            site.node,
            message,
            where=where,
            fix=None if computed(bound) else self._fix(source, site),
            lines=(statement_line,) if statement_line != line else (),
            data={"attribute": site.attr, "value": value},
        )

    @staticmethod
    def _fix(source: Source, site: Site) -> Fix | None:
        """Rename the attribute where the value is always a bool: ``requires_grad`` accepts nothing else."""
        if site.how not in ("=", "setattr") or not is_bool(site.value):
            return None
        start, end = source.span(site.node)
        text = source.text[start:end]
        if site.how == "setattr":
            match = _QUOTED.fullmatch(text)
            if match is None or match.group(2) != site.attr:
                return None  # an escape, a concatenation: leave the text alone
            start, end = start + match.start(2), start + match.end(2)
        elif text.endswith(site.attr):
            start = end - len(site.attr)
        else:
            return None  # an identifier spelled with characters Python normalises
        return Fix(f"Rename {site.attr} to {TARGET}", (Edit(start, end, TARGET),))
