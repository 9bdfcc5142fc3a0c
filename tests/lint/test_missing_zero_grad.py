"""GG101 missing-zero-grad, static form: what makes a training loop and what counts as a reset."""

from __future__ import annotations

import json
import textwrap

import pytest

from gradguard.lint import Source, lint_text
from gradguard.lint.rules.missing_zero_grad import MissingZeroGrad


def _hits(code: str):
    return list(MissingZeroGrad().check(Source("t.py", textwrap.dedent(code))))


def _lines(code: str) -> list[int]:
    return [hit.node.lineno for hit in _hits(code)]


BASIC = """\
for x, y in loader:
    loss = criterion(model(x), y)
    loss.backward()
    optimizer.step()
"""


def test_basic_loop_is_reported_at_the_step_with_the_loop_and_backward_lines():
    [hit] = _hits(BASIC)
    assert (hit.node.lineno, hit.where, hit.lines) == (4, "optimizer", (1, 3, 4))
    assert hit.message == (
        "`optimizer.step()` (line 4) applies the gradients that `loss.backward()` (line 3) adds to, and nothing "
        "in the loop from line 1 resets them: each step applies the sum of all earlier steps' gradients"
    )
    assert json.loads(json.dumps(hit.data)) == {"optimizer": "optimizer", "loop": 1, "backward": [3]}


def test_the_engine_reports_it_with_the_hint_and_every_line():
    [finding] = lint_text(BASIC, "t.py", select="GG101")
    assert (finding.code, finding.name, finding.location.line) == ("GG101", "missing-zero-grad", 4)
    assert finding.hint == "Call optimizer.zero_grad() once per step, before backward() (or after step())"
    assert finding.data["lines"] == [1, 3, 4]


def test_static_form_is_one_paragraph():
    assert MissingZeroGrad.static_form.startswith("`gradguard lint` flags ")
    assert "\n" not in MissingZeroGrad.static_form


@pytest.mark.parametrize(
    "reset",
    [
        "optimizer.zero_grad()",
        "optimizer.zero_grad(set_to_none=True)",
        "model.zero_grad()",
        "for p in model.parameters():\n        p.grad = None",
        "for p in params:\n        p.grad.data.zero_()",
        "for p in params:\n        p.grad.detach_().zero_()",
        "for p in params:\n        p.grad.fill_(0)",
        "for p in params:\n        p.grad *= 0",
        "for p in params:\n        del p.grad",
        "w.grad, b.grad = None, None",
        "zero_grads(model)",
        "utils.zero_grad_all(model)",
        "if (i + 1) % 4 == 0:\n        optimizer.zero_grad()",
        "try:\n        pass\n    except ValueError:\n        optimizer.zero_grad()",
    ],
)
def test_a_reset_anywhere_in_the_loop_counts(reset):
    code = f"for i, x in enumerate(loader):\n    {reset}\n    model(x).sum().backward()\n    optimizer.step()\n"
    assert _lines(code) == []


@pytest.mark.parametrize("where", ["before", "after"])
def test_a_reset_outside_the_loop_does_not_count(where):
    reset = "optimizer.zero_grad()\n"
    loop = "for x in loader:\n    model(x).sum().backward()\n    optimizer.step()\n"
    code = reset + loop if where == "before" else loop + reset
    assert _lines(code) == [4 if where == "before" else 3]


def test_reset_once_per_epoch_flags_the_inner_loop_with_its_header():
    code = """\
    for epoch in range(10):
        optimizer.zero_grad()
        for x in loader:
            model(x).sum().backward()
            optimizer.step()
    """
    [hit] = _hits(code)
    assert (hit.node.lineno, hit.lines) == (5, (3, 4, 5))


def test_accumulation_backward_inner_step_outer_uses_the_outer_loop():
    code = """\
    for batch in loader:
        for micro in batch.split(4):
            model(micro).sum().backward()
        optimizer.step()
    """
    [hit] = _hits(code)
    assert hit.lines == (1, 3, 4)


def test_while_and_async_for_loops():
    assert _lines("while True:\n    f(x).backward()\n    opt.step()\n") == [3]
    assert _lines("async def g():\n    async for x in s:\n        f(x).backward()\n        opt.step()\n") == [4]


def test_hand_written_updates_are_reported_at_the_update_with_the_parameter():
    code = """\
    for i in range(100):
        loss = ((X @ w - Y) ** 2).mean()
        loss.backward()
        w.data.sub_(lr * w.grad.data)
    """
    [hit] = _hits(code)
    assert (hit.node.lineno, hit.where, hit.lines) == (4, "w", (1, 3, 4))
    assert "updates `w` with the gradient that `loss.backward()` (line 3) adds to" in hit.message


@pytest.mark.parametrize(
    "update",
    ["p -= lr * p.grad", "p.data.add_(p.grad, alpha=-lr)", "p.add_(-lr * p.grad)", "p.data = p.data - lr * p.grad"],
)
def test_hand_written_update_forms(update):
    code = f"for x in data:\n    f(x).backward()\n    for p in model.parameters():\n        {update}\n"
    assert _lines(code) == [4]


def test_a_tensor_made_afresh_in_each_pass_is_not_updated_in_place_across_passes():
    code = "for i in range(9):\n    x = x.detach().requires_grad_()\n    f(x).backward()\n    x.data.sub_(x.grad)\n"
    assert _lines(code) == []


LBFGS = """\
def fit(model, x, y, optimizer):
    def closure():
        {reset}
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    for _ in range(20):
        optimizer.step(closure)
"""


def test_lbfgs_closure_without_reset_is_reported_with_the_closure_backward():
    [hit] = _hits(LBFGS.format(reset="pass"))
    assert (hit.node.lineno, hit.lines) == (9, (5, 8, 9))
    assert "nothing in the loop from line 8 or in its closure resets them" in hit.message


def test_lbfgs_closure_with_reset_is_not_reported():
    assert _lines(LBFGS.format(reset="optimizer.zero_grad()")) == []


def test_the_closure_is_the_one_in_scope_not_a_namesake():
    other = "\n\ndef other(optimizer):\n    def closure():\n        optimizer.zero_grad()\n"
    assert _lines(LBFGS.format(reset="pass") + other) == [9]


def test_a_closure_from_elsewhere_keeps_it_silent():
    assert _lines("for i in range(9):\n    f(x).backward()\n    opt.step(make())\n") == []
    assert _lines("for i in range(9):\n    opt.step(lambda: helper())\n") == []


def test_a_lambda_or_partial_closure_that_resets_through_a_helper():
    helper = "def ev():\n    model.zero_grad()\n    f(x).backward()\n"
    assert _lines(helper + "for i in range(9):\n    f(x).backward()\n    opt.step(lambda: ev())\n") == []
    assert _lines(helper + "for i in range(9):\n    f(x).backward()\n    opt.step(partial(ev))\n") == []


GAN = """\
for real in loader:
    {reset_d}
    netD(real).mean().backward()
    opt_d.step()
    opt_g.zero_grad()
    netD(netG(z)).mean().backward()
    opt_g.step()
"""


def test_a_gan_that_resets_one_optimizer_only():
    [hit] = _hits(GAN.format(reset_d="pass"))
    assert (hit.node.lineno, hit.where) == (4, "opt_d")
    assert "resets only `opt_g`, never `opt_d`" in hit.message


@pytest.mark.parametrize(
    "reset_d", ["opt_d.zero_grad()", "netD.zero_grad()", "for p in netD.parameters(): p.grad = None"]
)
def test_a_gan_that_resets_both_or_its_models(reset_d):
    assert _lines(GAN.format(reset_d=reset_d)) == []


def test_helpers_of_the_same_file_count_transitively_and_recursion_ends():
    code = """\
    def clear(m):
        m.zero_grad()

    def step_all(opt, m, depth):
        if depth:
            step_all(opt, m, depth - 1)
        clear(m)

    def ping():
        pong()

    def pong():
        ping()

    for x in loader:
        f(x).backward()
        optimizer.step()
        {call}
    """
    assert _lines(code.replace("{call}", "step_all(optimizer, model, 2)")) == []
    assert _lines(code.replace("{call}", "self.step_all(optimizer, model, 2)")) == []
    assert _lines(code.replace("{call}", "ping()")) == [17]


def test_self_methods_of_a_base_class_from_elsewhere_keep_it_silent():
    code = """\
    class T({base}):
        def fit(self, loader):
            for x in loader:
                self.model(x).sum().backward()
                self.optimizer.step()
                self.after_step()
    """
    assert _lines(code.format(base="BaseTrainer")) == []
    assert _lines(
        "class BaseTrainer:\n    def after_step(self):\n        pass\n" + code.format(base="BaseTrainer")
    ) == [8]
    assert _lines(code.format(base="object")) == [5]


def test_the_optimizer_handed_to_a_function_from_elsewhere_keeps_it_silent():
    loop = "for x in loader:\n    f(x).backward()\n    {call}\n    optimizer.step()\n"
    assert _lines(loop.format(call="tools.apply(optimizer)")) == []
    assert _lines(loop.format(call="scaler.unscale_(optimizer)")) == [4]


@pytest.mark.parametrize(
    ("guard", "expected"),
    [("if i == len(loader) - 1:", []), ("if (i + 1) % k == 0:", [4]), ("if ready:", [])],
)
def test_a_step_under_a_one_off_if_is_left_to_the_run(guard, expected):
    code = f"for i, x in enumerate(loader):\n    f(x).backward()\n    {guard}\n        optimizer.step()\n"
    assert _lines(code) == expected


def test_a_step_in_both_branches_repeats():
    code = (
        "for x in loader:\n    f(x).backward()\n    if amp:\n        scaler.step(opt)\n    else:\n        opt.step()\n"
    )
    assert _lines(code) == [4, 6]


def test_what_is_not_an_optimizer_step():
    assert _lines("for x in loader:\n    f(x).backward()\n    scheduler.step()\n    lr_sched.step()\n") == []
    assert _lines("for x in loader:\n    f(x).backward()\n    env.step(a)\n") == []
    assert _lines("for x in loader:\n    engine.backward(f(x))\n    engine.step()\n") == []
    assert _lines("o = torch.optim.SGD(m.parameters())\nfor x in loader:\n    f(x).backward()\n    o.step()\n") == [4]


def test_no_loop_no_backward_or_a_fresh_optimizer_is_not_reported():
    assert _lines("def train_step(b):\n    f(b).backward()\n    optimizer.step()\n") == []
    assert _lines("with torch.no_grad():\n    for x in loader:\n        total += f(x)\n") == []
    fresh = "for lr in lrs:\n    opt = torch.optim.SGD(m.parameters(), lr=lr)\n    f(m).backward()\n    opt.step()\n"
    assert _lines(fresh) == []


def test_a_step_hook_may_reset():
    hook = "optimizer.register_step_post_hook(lambda *a: optimizer.zero_grad())\n"
    assert _lines(hook + BASIC) == []


def test_suppressed_by_a_comment():
    code = BASIC.replace("optimizer.step()", "optimizer.step()  # gradguard: ignore[GG101]")
    assert lint_text(code, "t.py", select="GG101") == []


def test_a_gan_with_a_bare_reset_function_is_not_split_per_optimizer():
    assert _lines(GAN.format(reset_d="zero_grad(netD)")) == []
