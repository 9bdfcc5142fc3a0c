"""GG102 zero-grad-before-step, static form: a reset between ``backward()`` and the step it empties."""

from __future__ import annotations

import ast
import json
import textwrap

import pytest

from gradguard.lint import Source, lint_text
from gradguard.lint.rules.zero_grad_before_step import ZeroGradBeforeStep, erases


def _hits(code: str):
    return list(ZeroGradBeforeStep().check(Source("t.py", textwrap.dedent(code))))


def _lines(code: str) -> list[int]:
    return [hit.node.lineno for hit in _hits(code)]


BASIC = """\
for x, y in loader:
    loss = criterion(model(x), y)
    loss.backward()
    optimizer.zero_grad()
    optimizer.step()
"""


def test_basic_is_reported_at_the_reset_like_the_runtime_detector():
    [hit] = _hits(BASIC)
    assert (hit.node.lineno, hit.where, hit.lines) == (4, "optimizer", (3, 4, 5))
    assert hit.message == (
        "`optimizer.zero_grad()` (line 4) resets the gradients that `loss.backward()` (line 3) computed, before "
        "`optimizer.step()` (line 5) applies them: the step gets no gradient, so the parameters do not learn "
        "from them"
    )
    assert json.loads(json.dumps(hit.data)) == {"optimizer": "optimizer", "reset": "optimizer", "backward": 3}


def test_the_engine_reports_it_with_the_hint():
    [finding] = lint_text(BASIC, "t.py", select="GG102")
    assert (finding.code, finding.name, finding.location.line) == ("GG102", "zero-grad-before-step", 4)
    assert finding.hint == "Reset the gradients before backward() or after step(), never between them"
    assert finding.data["lines"] == [3, 4, 5]


def test_only_gg102_fires_when_the_only_reset_sits_between():
    assert [f.code for f in lint_text(BASIC, "t.py", select=["GG101", "GG102"])] == ["GG102"]


def test_static_form_is_one_paragraph():
    assert ZeroGradBeforeStep.static_form.startswith("`gradguard lint` flags ")
    assert "\n" not in ZeroGradBeforeStep.static_form


def test_no_loop_needed():
    assert _lines("def step(m, b, opt):\n    m(b).backward()\n    opt.zero_grad()\n    opt.step()\n") == [3]


@pytest.mark.parametrize(
    ("built", "expected"),
    [
        ("torch.optim.SGD(model.parameters(), lr=0.1)", [4]),
        ("optim.Adam(params=model.parameters())", [4]),
        ("AdamW([{'params': model.body.parameters()}, {'params': model.head.parameters(), 'lr': 1}])", [4]),
        ("SGD(filter(lambda p: p.requires_grad, model.parameters()))", [4]),
        ("SGD(list(model.parameters()) + list(head.parameters()))", []),
        ("SGD(teacher.parameters())", []),
        ("SGD(params)", []),
    ],
)
def test_a_model_reset_erases_an_optimizer_built_from_that_model(built, expected):
    code = f"opt = {built}\nfor x in loader:\n    model(x).sum().backward()\n    model.zero_grad()\n    opt.step()\n"
    assert _lines(code) == expected


def test_a_model_reset_with_the_only_optimizer_of_the_function():
    code = "def f(net, data, optimizer):\n    net(data).sum().backward()\n    net.zero_grad()\n    optimizer.step()\n"
    [hit] = _hits(code)
    assert "resets the gradients of `net` that" in hit.message


def test_the_only_optimizer_of_the_function_but_not_of_its_class():
    code = """\
    class Agent:
        def update_actor(self, obs):
            (-self.critic(obs, self.actor(obs))).mean().backward()
            self.critic.zero_grad()
            self.actor_optimizer.step()

        def update_critic(self, loss):
            self.critic_optimizer.zero_grad()
            loss.backward()
            self.critic_optimizer.step()
    """
    assert _lines(code) == []


def test_another_optimizers_reset_is_not_reported():
    code = "for r in loader:\n    d(r).mean().backward()\n    opt_g.zero_grad()\n    opt_d.step()\n"
    assert _lines(code) == []


@pytest.mark.parametrize(
    "loop",
    [
        "for p in model.parameters():\n        p.grad = None",
        "for name, p in model.named_parameters():\n        if p.grad is not None:\n            p.grad.zero_()",
        "for p in model.parameters():\n        p.grad.data.zero_()",
    ],
)
def test_a_reset_by_hand_over_the_models_parameters_is_reported_at_the_grad_line(loop):
    code = f"for x in loader:\n    model(x).sum().backward()\n    {loop}\n    optimizer.step()\n"
    [hit] = _hits(code)
    assert hit.node.lineno == loop.count("\n") + 3
    assert "in the loop over `model." in hit.message


def test_a_partial_reset_by_hand_is_not_an_erase():
    assert erases(ast.parse("for p in model.parameters():\n    p.grad[mask] = 0").body[0]) is None
    assert erases(ast.parse("for p in model.parameters():\n    if 'bias' in n:\n        p.grad = None").body[0]) is None


def test_a_reset_and_step_under_an_if_after_backward():
    code = "for i, x in enumerate(xs):\n    f(x).backward()\n    if (i + 1) % 4 == 0:\n"
    code += "        opt.zero_grad()\n        opt.step()\n"
    assert _lines(code) == [4]


def test_with_blocks_are_straight_line():
    code = """\
    for x in loader:
        with torch.autocast("cuda"):
            loss = model(x)
            scaler.scale(loss).backward()
        with torch.no_grad():
            optimizer.zero_grad()
        scaler.step(optimizer)
    """
    assert _lines(code) == [6]


@pytest.mark.parametrize(
    "between",
    [
        "if debug:\n        opt.zero_grad()",  # the reset may not run
        "opt.zero_grad()\n    f(x).mean().backward()",  # a new backward
        "opt.zero_grad()\n    for p, g in zip(ps, gs):\n        p.grad = g",  # gradients written back
        "opt.zero_grad()\n    p.grad.copy_(g)",
        "opt.zero_grad()\n    opt.pc_backward(losses)",
        "opt.zero_grad()\n    recompute(x)",  # a helper of this file
        "opt.zero_grad()\n    if done:\n        return",
        "opt.zero_grad()\n    for _ in range(2):\n        opt.step()",  # a step that may run
    ],
)
def test_what_may_give_the_gradients_back_keeps_it_silent(between):
    code = f"def recompute(x):\n    pass\nfor x in xs:\n    f(x).backward()\n    {between}\n    opt.step()\n"
    assert _lines(code) == []


def test_unrelated_statements_between_do_not_matter():
    code = "for x in xs:\n    f(x).backward()\n    opt.zero_grad()\n    log.info('x')\n"
    code += "    if c:\n        n += 1\n    opt.step()\n"
    assert _lines(code) == [3]


@pytest.mark.parametrize(
    "before",
    [
        "if warm:\n        f(x).backward()",  # a backward that may not have run
        "f(x).backward()\n    opt.step()",  # applied since
        "pass",  # no backward at all
    ],
)
def test_the_backward_must_surely_run_since_the_last_step(before):
    assert _lines(f"for x in xs:\n    {before}\n    opt.zero_grad()\n    opt.step()\n") == []


def test_a_step_with_a_closure_runs_its_own_backward():
    assert _lines("f(x).backward()\nopt.zero_grad()\nopt.step(closure)\n") == []


def test_lbfgs_closure_that_resets_first_and_the_usual_orders_are_silent():
    code = """\
    def closure():
        optimizer.zero_grad()
        loss = model(x)
        loss.backward()
        return loss

    for _ in range(9):
        optimizer.step(closure)
    for x in loader:
        model(x).backward()
        optimizer.step()
        optimizer.zero_grad()
    """
    assert _lines(code) == []


def test_suppressed_by_a_comment():
    code = BASIC.replace("optimizer.zero_grad()", "optimizer.zero_grad()  # gradguard: ignore[GG102]")
    assert lint_text(code, "t.py", select="GG102") == []
