"""GG201 graph-retained, static form: what is flagged, what is not, and when ``--fix`` adds ``.item()``."""

from __future__ import annotations

import textwrap

import pytest

from gradguard.lint import Source, lint_text
from gradguard.lint.fixes import apply_fixes
from gradguard.lint.rules.graph_retained import GraphRetained, numbers_only
from gradguard.lint.taint import Taint


def _hits(code: str):
    return list(GraphRetained().check(Source("train.py", textwrap.dedent(code))))


def _flagged(code: str) -> list[tuple[int, str]]:
    return [(f.location.line, f.where) for f in lint_text(textwrap.dedent(code), "train.py", select="GG201")]


def _fixed(code: str) -> str | None:
    code = textwrap.dedent(code)
    fixes = [h.fix for h in _hits(code) if h.fix is not None]
    return apply_fixes(code, fixes)[0] if fixes else None


LOOP = """
def train(model, loader, optimizer, criterion):
    total = 0.0
    losses = []
    for x, y in loader:
        optimizer.zero_grad()
        out = model(x)
        loss = criterion(out, y)
        loss.backward()
        optimizer.step()
        {line}
    print(total, len(losses))
"""


@pytest.mark.parametrize(
    ("line", "where"),
    [
        ("total += loss", "total"),
        ("total = total + loss", "total"),
        ("total = total + 0.5 * loss", "total"),
        ("losses.append(loss)", "losses"),
        ("losses.append(out)", "losses"),
        ("losses.append(loss / 4)", "losses"),
        ("losses.append(loss.mean())", "losses"),
        ("losses.append(loss.cpu())", "losses"),
        ("losses.append(loss if buggy else loss.detach())", "losses"),
        ("losses.extend([loss, loss.item()])", "losses"),
        ("losses.insert(0, loss)", "losses"),
        ("losses[0] = loss", "losses"),
        ("self.history.append(loss)", "self.history"),
        ('self.history["train"].append({"loss": loss})', "self.history"),
        ("losses.append(criterion(out, y) * 2)", "losses"),
    ],
)
def test_each_form_that_keeps_a_graph_is_flagged_at_its_line(line, where):
    assert _flagged(LOOP.format(line=line)) == [(11, where)]


@pytest.mark.parametrize(
    "line",
    [
        "total += loss.item()",
        "total += float(loss)",
        "losses.append(loss.detach())",
        "losses.append(loss.detach().cpu())",
        "losses.append(loss.tolist())",
        "losses.append(loss.data)",
        "losses.append(out.argmax(1))",
        "losses.append(out.max(1)[1])",
        "losses.append((out.argmax(1) == y).float().mean())",
        "losses.append(x)",
        "losses.append(f'{loss:.3f}')",
        "losses.append(len(out))",
        "losses.append(out.shape)",
        "losses.append(helper(loss))",
    ],
)
def test_numbers_detached_tensors_inputs_and_unknown_helpers_are_not_flagged(line):
    assert _flagged(LOOP.format(line=line)) == []


def test_the_finding_names_the_variable_the_loop_and_the_backward_line():
    code = LOOP.format(line="total += loss")
    (hit,) = _hits(code)
    assert (hit.node.lineno, hit.where, hit.lines) == (11, "total", (5, 9))
    assert hit.data == {"variable": "total", "origin": "backward", "origin_line": 9}
    assert hit.message.startswith(
        "`total += loss` (line 11) adds the tensor that `loss.backward()` differentiates (line 9) to `total`, "
        "which lives across the iterations of the loop at line 5: "
    )
    (finding,) = lint_text(textwrap.dedent(code), "train.py", select="GG201")
    assert (finding.code, finding.name, finding.data["lines"]) == ("GG201", "graph-retained", [5, 9, 11])
    assert finding.hint == GraphRetained.hint
    (hit,) = _hits(LOOP.format(line="losses.append(out)"))
    assert (hit.data["origin"], hit.lines) == ("model", (5, 7))
    assert "a tensor computed by the model `model(x)` (line 7)" in hit.message


@pytest.mark.parametrize(
    "code",
    [  # beside the correct loops of fixtures/GG201.py
        "outs = []\nfor x, y in loader:\n    criterion(model(x), y).backward()\n    with torch.no_grad():\n"
        "        outs.append(model(x))\n",
        "@torch.no_grad()\ndef f(loader):\n    total = 0\n    for x, y in loader:\n        out = model(x)\n"
        "        total += criterion(out, y)\n        out.backward()\n",
        "total = 0\nfor x, y in loader:\n    loss = criterion(model(x), y)\n    loss.backward()\n"
        "    with torch.no_grad():\n        total += loss\n",  # an addition under no_grad records no graph
        "saved = []\nfor t in range(9):\n    saved.append(policy(s))\n    if done:\n"
        "        compute_loss(saved).backward()\n        saved = []\n",  # differentiated through a helper
        "for batch in loader:\n    batch['out'] = model(batch['x'])\n    criterion(batch['out'], 0).backward()\n",
        "backbone.requires_grad_(False)\nbank = []\nfor x, y in loader:\n    f = backbone(x)\n    bank.append(f)\n"
        "    criterion(head(f), y).backward()\n",  # a frozen model's outputs
    ],
)
def test_correct_loops_are_not_flagged(code):
    assert _flagged(code) == []


LIGHTNING = """
import lightning as L

class Module(L.LightningModule):
    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self.net(x)
        loss = F.cross_entropy(logits, y)
        {line}
        self.log("loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.val_outputs.append(self.net(batch[0]))
"""


@pytest.mark.parametrize(
    ("line", "flagged"),
    [
        ("self.step_losses.append(loss)", [(9, "self.step_losses")]),
        ("self.step_logits.append(logits)", [(9, "self.step_logits")]),
        ('self.outputs.append({"loss": loss})', [(9, "self.outputs")]),
        ("self.total += loss", [(9, "self.total")]),
        ("self.step_losses.append(loss.detach())", []),
        ("self.preds.append(logits.argmax(-1))", []),
        ('outputs = [{"loss": loss}]', []),
        ("self.step_losses = [loss]", []),
    ],
)
def test_a_lightning_training_step_is_a_loop_body_for_what_it_keeps_on_self(line, flagged):
    assert _flagged(LIGHTNING.format(line=line)) == flagged


def test_a_lightning_finding_points_at_the_returned_loss():
    (hit,) = _hits(LIGHTNING.format(line="self.step_losses.append(loss)"))
    assert (hit.data["origin"], hit.lines) == ("returned", (5, 11))
    assert "outlives each call of `training_step` (one per batch)" in hit.message


def test_a_plain_module_is_not_a_lightning_module():
    code = LIGHTNING.format(line="self.step_losses.append(loss)").replace("(L.LightningModule)", "(nn.Module)")
    assert _flagged(code) == []


FIX = """
def train(model, loader, optimizer, criterion, logger, writer):
    total = 0
    for step, (x, y) in enumerate(loader):
        loss = criterion(model(x), y)
        loss.backward()
        optimizer.step()
        {line}
    {use}
"""


@pytest.mark.parametrize(
    ("line", "fixed"),
    [
        ("total += loss", "total += loss.item()"),
        ("total += loss * x.size(0)", "total += (loss * x.size(0)).item()"),
        ("total += loss / len(x)", "total += (loss / len(x)).item()"),
        ("total += 2 * loss", "total += (2 * loss).item()"),
    ],
)
def test_fix_adds_item_to_the_value_only(line, fixed):
    code = FIX.format(line=line, use='print(f"{total / len(loader):.3f}")')
    new = _fixed(code)
    assert new == textwrap.dedent(code).replace(line, fixed)
    assert _flagged(new) == []
    assert len(new.splitlines()) == len(textwrap.dedent(code).splitlines())


@pytest.mark.parametrize(
    "use",
    [
        'print("loss %.3f" % (total / len(loader)))',
        'logger.info("loss %s", total)',
        'writer.add_scalar("loss", total, step)',
        "avg = total / len(loader)\n    print(round(avg, 3))",
        "if total > 1:\n        print(math.log(total))",
        "print('{:.2f}'.format(total))",
    ],
)
def test_fix_when_the_total_is_only_used_as_a_number(use):
    code = FIX.format(line="total += loss", use=use)
    assert _fixed(code) == textwrap.dedent(code).replace("total += loss", "total += loss.item()")


@pytest.mark.parametrize(
    "use",
    [
        "return total",
        "history.append(total)",
        "print(total.item())",
        "avg = total / len(loader)\n    return avg",
        "def show():\n        print(total)",
        "save(total)",
    ],
)
def test_no_fix_when_the_total_may_be_used_as_a_tensor(use):
    code = FIX.format(line="total += loss", use=use)
    assert [(h.where, h.fix) for h in _hits(code)] == [("total", None)]


@pytest.mark.parametrize(
    ("line", "old", "new"),
    [
        ("total += loss", "loss.backward()", "loss.mean().backward()"),  # the loss may not be a scalar
        ("total += loss", "loss.backward()", "loss.backward(g)"),  # a gradient is given
        ("total += loss", "total = 0", "total = torch.zeros(())"),  # the total starts as a tensor
        ("total += loss * w", "", ""),  # w may be a tensor
        ("total += loss\n        total += extra", "", ""),  # extra may be a tensor
        ("total = total + loss", "", ""),  # only += is fixed
        ("losses.append(loss)", "", ""),  # an append is not fixed: the hint says what to do
    ],
)
def test_no_fix_when_item_might_not_be_safe(line, old, new):
    (hit,) = _hits(FIX.format(line=line, use="print(total)").replace(old, new))
    assert hit.fix is None


def test_numbers_only_follows_assignments_and_stops_at_anything_else():
    code = textwrap.dedent(
        """
        def f(xs):
            t = 0
            for x in xs:
                t += x
            mean = t / len(xs)
            print(f"{round(mean, 2)}")
            best = min(t, 3)
            return best
        """
    )
    source = Source("t.py", code)
    scope = source.tree.body[0]
    assert numbers_only(Taint(source), "mean", scope)
    assert not numbers_only(Taint(source), "best", scope)
    assert not numbers_only(Taint(source), "t", scope)  # via best, returned


def test_reaching_definitions_see_through_branches_and_stop_at_a_rebinding():
    code = textwrap.dedent(
        """
        for x in data:
            loss = crit(x)
            if a:
                loss = loss * 2
            else:
                loss = loss.item()
            use(loss)
            loss = 0
            use(loss)
        """
    )
    source = Source("t.py", code)
    taint = Taint(source)
    body = source.tree.body[0].body
    assert sorted(d.lineno for d in taint.reaching("loss", body[2])) == [5, 7]
    assert [d.lineno for d in taint.reaching("loss", body[4])] == [9]
    assert taint.reaching("x", body[0]) == {source.tree.body[0]}


def test_the_rule_page_paragraph_says_what_is_flagged_fixed_and_left_to_the_run():
    text = GraphRetained.static_form
    assert text.startswith("`gradguard lint` flags ")
    assert "\n" not in text
    for part in ("`--fix`", "`total += loss.item()`", "left to the run", "training_step", "torch.no_grad()"):
        assert part in text
