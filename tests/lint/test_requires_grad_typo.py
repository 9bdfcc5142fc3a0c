"""GG401 requires-grad-typo, static form: what is flagged, what is fixed, and what is left alone."""

from __future__ import annotations

import textwrap

import pytest

from gradguard.lint import lint_text
from gradguard.lint.engine import check
from gradguard.lint.fixes import apply_fixes
from gradguard.lint.rules.requires_grad_typo import RequiresGradTypo, is_bool, sites, user_attributes
from gradguard.lint.source import Source
from gradguard.spelling import is_near_miss


def _lint(text):
    return lint_text(textwrap.dedent(text), "train.py", select="GG401")


def _fixed(text):
    source = Source("train.py", textwrap.dedent(text))
    findings, fixes, _ = check(source, [RequiresGradTypo()])
    return findings, apply_fixes(source.text, fixes)[0]


def test_a_misspelt_freeze_is_reported_at_the_attribute_with_the_runtime_hint():
    (finding,) = _lint(
        """\
        def freeze(model):
            for p in model.backbone.parameters():
                p.requres_grad = False
        """
    )
    assert (finding.location.line, finding.data["column"], finding.location.function) == (3, 9, "freeze")
    assert finding.where == "p"
    assert finding.message == (
        "`p.requres_grad = False` sets a new attribute that nothing reads: `requres_grad` is a misspelling of "
        "`requires_grad`, so p keeps training"
    )
    assert finding.hint == "Spell it requires_grad, or call module.requires_grad_(False) / p.requires_grad_(False)"
    assert finding.data["fix"] == "Rename requres_grad to requires_grad"
    assert finding.data["attribute"] == "requres_grad"


@pytest.mark.parametrize(
    "name",
    ["requres_grad", "require_grad", "requires_grads", "requiresgrad", "Requires_Grad", "requires_grad_",
     "requries_grad", "requires_grad", "retains_grad", "grad", "require", "requires_grad_sync_enabled"],
)  # fmt: skip
def test_an_attribute_is_flagged_exactly_when_the_runtime_calls_it_a_near_miss(name):
    assert bool(_lint(f"p.{name} = False\n")) == is_near_miss(name)


@pytest.mark.parametrize(
    ("value", "fixed"),
    [("False", True), ("True", True), ("not frozen", True), ("name in trainable", True), ("p is None", True),
     ("bool(flag)", True), ("flag", False), ("epoch > 3", False), ("0", False), ("make()", False),
     ("a and b", False), ("None", False)],
)  # fmt: skip
def test_the_rename_is_offered_only_for_values_that_are_always_bools(value, fixed):
    findings, text = _fixed(f"p.requres_grad = {value}\n")
    assert len(findings) == 1  # reported either way
    assert ("fix" in findings[0].data) is fixed
    assert text == (f"p.requires_grad = {value}\n" if fixed else f"p.requres_grad = {value}\n")


def test_the_message_says_what_the_value_asked_for():
    true, other = _lint("x.requiresgrad = True\nw.require_grad = flag\n")
    assert true.message.endswith("so x is not made trainable")
    assert other.message.endswith("so w.requires_grad stays as it was")


def test_every_form_of_assignment_is_flagged_and_fixed_in_place():
    findings, text = _fixed(
        """\
        a.requres_grad = b.requres_grad = False
        c.requres_grad, (d.require_grad, e.x) = False, (True, 1)
        f.requres_grad: bool = False
        setattr(g, 'requres_grad', False)
        h.requres_grad |= True
        i.requres_grad, *rest = flags
        """
    )
    assert [(f.location.line, f.where) for f in findings] == [
        (1, "a"), (1, "b"), (2, "c"), (2, "d"), (3, "f"), (4, "g"), (5, "h"), (6, "i"),
    ]  # fmt: skip
    assert text == textwrap.dedent(
        """\
        a.requires_grad = b.requires_grad = False
        c.requires_grad, (d.requires_grad, e.x) = False, (True, 1)
        f.requires_grad: bool = False
        setattr(g, 'requires_grad', False)
        h.requres_grad |= True
        i.requres_grad, *rest = flags
        """
    )
    assert findings[5].message.startswith('`setattr(g, "requres_grad", False)` sets a new attribute')
    assert findings[6].message.startswith("`h.requres_grad |= True` sets a new attribute")


def test_setattr_is_reported_at_its_quoted_name_and_a_name_it_cannot_rewrite_is_not_fixed():
    (finding,) = _lint('setattr(p, "requres_grad", False)\n')
    assert finding.data["column"] == 12
    findings, text = _fixed('setattr(p, "requres" "_grad", False)\nsetattr(p, "requres_grad", flag)\n')
    assert len(findings) == 2
    assert text == 'setattr(p, "requres" "_grad", False)\nsetattr(p, "requres_grad", flag)\n'


def test_a_target_on_another_line_than_its_statement_names_both_lines():
    findings = _lint("a.requres_grad = \\\n    b.requres_grad = False\n")
    assert [(f.location.line, f.data["lines"]) for f in findings] == [(1, [1]), (2, [1, 2])]


def test_the_receiver_is_named_by_its_dotted_path_or_its_source():
    findings = _lint("model.layers[0].weight.require_grad = False\nget(model).require_grad = False\n")
    assert [f.where for f in findings] == ["model.layers[0].weight", "get(model)"]


@pytest.mark.parametrize(
    "text",
    [
        "p.requires_grad = False\nmodel.requires_grad_(False)\n",
        "if p.requres_grad:\n    pass\n",  # a read raises AttributeError: loud
        "torch.zeros(2, require_grad=True)\n",  # a TypeError: loud
        "setattr(p, name, False)\n",
        "class C:\n    requres_grad = False\n",  # a bare name in a class body
        "cfg['requres_grad'] = False\n",
        "del p.requres_grad\n",
    ],
)
def test_reads_keywords_computed_names_and_non_attributes_are_not_flagged(text):
    assert _lint(text) == []


@pytest.mark.parametrize(
    "text",
    [
        "args.require_grad = True\nif args.require_grad:\n    pass\n",
        "p.require_grad = False\nuse(getattr(p, 'require_grad'))\n",
        "p.require_grad = False\nif hasattr(p, 'require_grad'):\n    pass\n",
        "class Cfg:\n    require_grad: bool = True\ncfg.require_grad = False\n",
        "class Cfg:\n    @property\n    def require_grad(self):\n        return 1\ncfg.require_grad = False\n",
        "class T:\n    __slots__ = ('require_grad',)\nt.require_grad = False\n",
    ],
)
def test_an_attribute_the_file_reads_or_declares_belongs_to_the_program(text):
    assert _lint(text) == []


def test_the_objects_own_attributes_are_its_design_but_its_parts_are_checked():
    findings = _lint(
        """\
        class Block:
            def __init__(self, require_grad=True):
                self.require_grad = require_grad
                self.proj.weight.require_grad = False
            @classmethod
            def make(cls):
                cls.requres_grad = False
        """
    )
    assert [(f.location.line, f.where) for f in findings] == [(4, "self.proj.weight")]


def test_calling_requires_grad_underscore_does_not_hide_it_set_as_an_attribute():
    findings = _lint("model.requires_grad_(False)\np.requires_grad_ = False\n")
    assert [f.location.line for f in findings] == [2]
    assert "`requires_grad_` is the method, not the flag `requires_grad`" in findings[0].message


def test_fixing_twice_changes_nothing_more():
    _, once = _fixed("for p in params:\n    p.requres_grad = False  # freeze\n")
    assert once == "for p in params:\n    p.requires_grad = False  # freeze\n"
    assert _lint(once) == []


def test_helpers():
    assert is_bool(None) is False
    assert [s.how for s in sites(Source("t.py", "a.b += 1\nsetattr(a, 'b', 1, 2)\n").tree)] == ["+="]
    assert "x" in user_attributes(Source("t.py", "print(a.x)\n").tree)
    assert "requires_grad_" not in user_attributes(Source("t.py", "p.requires_grad_(False)\n").tree)


@pytest.mark.parametrize(
    ("binding", "fixed"),
    [
        ("x = torch.zeros(3, 4)", True),
        ("x = torch.zeros(3, 4).float().cuda()", True),
        ("x = nn.Parameter(torch.zeros(3))", True),
        ("x = out.detach()", True),
        ("x = out.detach().cpu()", True),
        ("x = y", True),
        ("x = layer.weight", True),
        ("for x in model.parameters(): pass", True),
        ("x = model(inputs)", False),  # computed: setting the real flag would raise
        ("x = inputs.clone()", False),
        ("x = a * b", False),
        ("x = batch[0]", False),
        ("x, h = rnn(inputs)", False),
        ("x = torch.zeros(3, requires_grad=True).cuda()", False),
        ("x = nn.Parameter(w).to(device)", False),
        ("x = torch.zeros(3)\nx += 1", False),
    ],
)
def test_the_rename_is_not_offered_on_a_tensor_that_autograd_may_have_computed(binding, fixed):
    findings, text = _fixed(f"{binding}\nx.requres_grad = False\n")
    assert len(findings) == 1
    assert text.endswith("x.requires_grad = False\n" if fixed else "x.requres_grad = False\n")


def test_a_tensor_made_in_the_function_is_not_said_to_keep_training():
    made, param = _lint("def f(model, x):\n    out = model(x)\n    out.requres_grad = False\n"
                        "    for p in model.parameters():\n        p.requres_grad = False\n")  # fmt: skip
    assert made.message.endswith("so out.requires_grad stays as it was")
    assert param.message.endswith("so p keeps training")


def test_the_binding_seen_is_the_last_one_before_the_assignment_in_its_scope():
    text = "x = model(a)\ndef f():\n    x = torch.ones(1)\n    x.requres_grad = False\nx = torch.ones(1)\n"
    _, fixed = _fixed(text)
    assert "    x.requires_grad = False\n" in fixed  # the function's own x, not the module's
    _, kept = _fixed("x = torch.ones(1)\nx = model(x)\nx.requres_grad = False\n")
    assert kept.endswith("x.requres_grad = False\n")
