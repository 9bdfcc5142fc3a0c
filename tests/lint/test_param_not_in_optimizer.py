"""GG403 param-not-in-optimizer, static form: a layer put into a model after its optimizer was built."""

from __future__ import annotations

import textwrap

import pytest

from gradguard.lint import lint_text

HEAD = """\
import torch
from torch import nn

optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
model.fc = {value}
for x, y in loader:
    optimizer.zero_grad()
    loss_fn(model(x), y).backward()
    optimizer.step()
"""


def _lint(text):
    return lint_text(textwrap.dedent(text), "train.py", select="GG403")


def _flagged(value, header=""):
    return bool(_lint(header + HEAD.format(value=value)))


def test_a_head_replaced_after_the_optimizer_is_reported_at_the_replacement():
    (finding,) = _lint(HEAD.format(value="nn.Linear(512, 10)"))
    assert (finding.location.line, finding.data["column"], finding.where) == (5, 1, "model.fc")
    assert finding.message == (
        "`model.fc = nn.Linear(512, 10)` (line 5) replaces a layer of model after `optimizer` was built from "
        "model.parameters() (line 4): the new layer's parameters are not in the optimizer and never train"
    )
    assert finding.hint == (
        "Build the optimizer after replacing layers, or add the new parameters with "
        "optimizer.add_param_group({'params': ...})"
    )
    assert finding.data["lines"] == [4, 5, 9]  # the optimizer, the replacement, the step the run reports at
    assert (finding.data["optimizer"], finding.data["model"], finding.data["kind"]) == ("optimizer", "model", "layer")


@pytest.mark.parametrize(
    ("value", "flagged"),
    [("nn.Linear(512, 10)", True), ("torch.nn.Linear(512, 10).to(device)", True), ("nn.LSTM(512, 256)", True),
     ("nn.Linear(512, 10).cuda().requires_grad_()", True), ("nn.Embedding(100, 512)", True),
     ("nn.Sequential(nn.Dropout(0.5), nn.Linear(512, 10))", True), ("nn.BatchNorm1d(512)", True),
     ("nn.ModuleList([nn.Conv2d(3, 3, 1) for _ in range(2)])", True), ("nn.InstanceNorm1d(512, affine=True)", True),
     ("nn.TransformerEncoderLayer(512, 8, 2048)", True), ("nn.LayerNorm(512)", True), ("nn.RMSNorm(512)", True),
     ("nn.Identity()", False), ("nn.ReLU()", False), ("nn.Dropout(0.1)", False), ("nn.CrossEntropyLoss()", False),
     ("nn.Sequential(nn.Dropout(0.5), model.fc)", False), ("nn.BatchNorm1d(512, affine=False)", False),
     ("nn.BatchNorm1d(512, affine=cfg.affine)", False), ("nn.InstanceNorm1d(512)", False),
     ("nn.LayerNorm(512, elementwise_affine=False)", False), ("nn.Linear(512, 10).requires_grad_(False)", False),
     ("make_head(512)", False), ("model.head", False), ("torch.zeros(10, 512)", False), ("None", False)],
)  # fmt: skip
def test_only_values_that_visibly_own_trainable_parameters_count(value, flagged):
    assert _flagged(value) is flagged


@pytest.mark.parametrize(
    ("value", "header", "flagged"),
    [
        ("Linear(512, 10)", "from torch.nn import Linear\n", True),
        ("tnn.Linear(512, 10)", "import torch.nn as tnn\n", True),
        ("Head(512)", "from heads import Head\n", True),
        ("layers.Head(512)", "import layers\n", True),
        ("HeadConfig(512)", "from heads import HeadConfig\n", False),
        ("FocalLoss()", "from losses import FocalLoss\n", False),
        ("Head(512)", "", False),  # neither defined nor imported
        ("torchvision.models.resnet18()", "import torchvision\n", False),
        ("Head(512)", "class Head(nn.Module):\n    def __init__(self):\n        self.fc = nn.Linear(2, 2)\n", True),
        ("Sub(512)", "class Base(nn.Module):\n    def __init__(self):\n        self.w = nn.Parameter(x)\n"
         "class Sub(Base):\n    pass\n", True),
        ("Wide(512)", "class Wide(nn.Linear):\n    pass\n", True),
        ("Scale()", "class Scale(nn.Module):\n    def forward(self, x):\n        return 2 * x\n", False),
        ("Config()", "class Config:\n    fc = nn.Linear(2, 2)\n", False),  # not a module: no base class
        ("Loop()", "class Loop(nn.Module):\n    def __init__(self):\n        self.again = Loop()\n", False),
    ],
)  # fmt: skip
def test_classes_count_when_imported_or_defined_with_parameters(value, header, flagged):
    assert _flagged(value, header) is flagged


@pytest.mark.parametrize(
    "params",
    ["model.parameters()", "list(model.parameters())", "params=model.parameters()", "[*model.parameters(), extra]",
     "[p for p in model.parameters() if p.requires_grad]", "(p for n, p in model.named_parameters() if 'b' in n)",
     "filter(lambda p: p.requires_grad, model.parameters())", "itertools.chain(model.fc.parameters(), x.parameters())",
     "[{'params': model.backbone.parameters(), 'lr': 1e-5}, {'params': model.fc.parameters()}]"],
)  # fmt: skip
def test_every_usual_way_of_passing_the_parameters_is_understood(params):
    text = f"opt = torch.optim.Adam({params})\nmodel.fc = nn.Linear(2, 2)\nopt.step()\n"
    assert [f.location.line for f in _lint(text)] == [2]


@pytest.mark.parametrize(
    "builder", ["optim.SGD", "torch.optim.AdamW", "AdamW", "Lion", "bnb.optim.Adam8bit", "ZeroRedundancyOptimizer",
                "make_optimizer"]
)  # fmt: skip
def test_optimizers_are_callables_named_with_optim_or_after_a_known_optimizer(builder):
    text = f"opt = {builder}(model.parameters())\nmodel.fc = nn.Linear(2, 2)\nopt.step()\n"
    assert len(_lint(text)) == 1


@pytest.mark.parametrize("builder", ["build", "torch.nn.utils.clip_grad_norm_", "opt.add_param_group"])
def test_other_calls_over_parameters_are_no_optimizers(builder):
    assert _lint(f"opt = {builder}(model.parameters())\nmodel.fc = nn.Linear(2, 2)\nopt.step()\n") == []


def test_the_ways_a_layer_is_added_each_name_the_new_path():
    findings = _lint(
        """\
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        model.classifier[6] = nn.Linear(4096, 10)
        setattr(model, "head", nn.Linear(2, 2))
        setattr(model, name, nn.Linear(2, 2))
        model.backbone.add_module("adapter", nn.Linear(2, 2))
        model.register_module("extra", nn.Conv2d(3, 3, 1))
        model.register_parameter("scale", nn.Parameter(torch.ones(1)))
        model.blocks.append(nn.Linear(2, 2))
        model.fc.weight = nn.Parameter(torch.zeros(2, 2))
        model.fc.weight = nn.Parameter(torch.zeros(2, 2), requires_grad=False)
        model.register_parameter("frozen", nn.Parameter(torch.ones(1), False))
        opt.step()
        """
    )
    assert [f.where for f in findings] == [
        "model.classifier[6]", "model.head", "model.<name>", "model.backbone.adapter", "model.extra", "model.scale",
        "model.blocks[-1]", "model.fc.weight",
    ]  # fmt: skip
    assert "adds a layer to model after" in findings[3].message
    assert "adds a parameter to model after" in findings[5].message
    assert findings[5].message.endswith("the new parameter is not in the optimizer and never trains")
    assert "replaces a parameter of model after" in findings[7].message


def test_the_message_names_the_layer_the_optimizer_was_built_from():
    (same, holder) = _lint(
        """\
        opt = torch.optim.SGD(model.fc.parameters(), lr=0.1)
        opt2 = torch.optim.SGD(model.backbone.layer4.named_parameters(), lr=0.1)
        model.fc = nn.Linear(2, 2)
        model.backbone = Backbone()
        train(opt, opt2)
        """.replace("Backbone()", "nn.Sequential(nn.Conv2d(3, 3, 1))")
    )
    assert "replaces model.fc after `opt` was built from model.fc.parameters() (line 1)" in same.message
    assert "replaces model.backbone after `opt2` was built from model.backbone.layer4.named_parameters()" in (
        holder.message
    )


@pytest.mark.parametrize(
    "after",
    ["optimizer = torch.optim.SGD(model.parameters(), lr=0.01)", "optimizer = torch.optim.SGD(model.fc.parameters())",
     "optimizer = build(model)", "new_opt = create_optimizer(cfg, model)", "optimizer.add_param_group(group)",
     "optimizer.add_param_group({'params': model.fc.parameters()})", "optimizer.add_param_group({'params': new})",
     "model.fc.requires_grad_(False)", "model.requires_grad_(False)", "model.fc.weight.requires_grad = False",
     "for p in model.fc.parameters():\n    p.requires_grad = False", "freeze(model.fc)",
     "for n, p in model.named_parameters():\n    p.requires_grad_(False)"],
)  # fmt: skip
def test_rebuilt_given_or_frozen_afterwards_is_not_flagged(after):
    text = HEAD.format(value="nn.Linear(512, 10)").replace("for x, y", after + "\nfor x, y", 1)
    assert _lint(text) == []


@pytest.mark.parametrize(
    "after",
    [
        "optimizer.add_param_group({'params': model.fc2.parameters()})",
        "model.backbone.requires_grad_(False)",
        "model.fc.requires_grad_(True)",
        "for p in model.backbone.parameters():\n    p.requires_grad = False",
        "torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)",
        "print(model.fc)",
    ],
)
def test_what_leaves_the_new_layer_out_of_the_optimizer_still_is_flagged(after):
    text = HEAD.format(value="nn.Linear(512, 10)").replace("for x, y", after + "\nfor x, y", 1)
    assert len(_lint(text)) == 1


@pytest.mark.parametrize(
    "between",
    [
        "model = build_model()",
        "model = torch.compile(model)",
        "optimizer = Lookahead(optimizer)",
        "for model in m: pass",
    ],
)
def test_a_model_or_optimizer_rebound_in_between_is_another_object(between):
    text = HEAD.format(value="nn.Linear(512, 10)").replace("model.fc =", between + "\nmodel.fc =", 1)
    assert _lint(text) == []


def test_the_model_must_be_the_optimizers_or_hold_its_layers():
    assert _lint("opt = SGD(student.parameters())\nteacher.fc = nn.Linear(2, 2)\nopt.step()\n") == []
    assert _lint("opt = SGD(model.backbone.parameters())\nmodel.fc = nn.Linear(2, 2)\nopt.step()\n") == []
    assert _lint("opt = SGD(model.parameters())\nmodel = nn.Linear(2, 2)\nopt.step()\n") == []


def test_a_layer_replaced_before_the_optimizer_is_not_flagged():
    assert _lint("model.fc = nn.Linear(2, 2)\nopt = torch.optim.SGD(model.parameters())\nopt.step()\n") == []


def test_an_optimizer_not_used_after_the_replacement_is_not_flagged():
    unused = "def stage(model):\n    opt = SGD(model.parameters())\n    train(opt)\n    model.fc = nn.Linear(2, 2)\n"
    assert _lint(unused) == []
    assert _lint("SGD(model.parameters())\nmodel.fc = nn.Linear(2, 2)\n") == []  # not kept anywhere
    kept = "def setup(self):\n    self.opt = SGD(self.net.parameters())\n    self.net.fc = nn.Linear(2, 2)\n"
    assert [f.where for f in _lint(kept)] == ["self.net.fc"]  # kept on the object: used by its other methods


def test_a_replacement_in_a_loop_that_steps_the_optimizer_again_is_flagged():
    (finding,) = _lint(
        """\
        opt = optim.SGD(model.parameters(), lr=0.1)
        for epoch in range(10):
            for x, y in loader:
                opt.step()
            if epoch == 5:
                model.fc = nn.Linear(128, 1)
        """
    )
    assert (finding.location.line, finding.data["lines"]) == (6, [1, 4, 6])
    rebuilt = "for e in range(9):\n    opt = SGD(model.parameters())\n    opt.step()\n    model.fc = nn.Linear(2, 2)\n"
    assert _lint(rebuilt) == []  # each epoch builds the optimizer again, after the replacement


def test_a_global_optimizer_used_by_a_function_is_used_afterwards():
    text = "opt = SGD(model.parameters())\nmodel.fc = nn.Linear(2, 2)\ndef train():\n    opt.step()\n"
    assert [f.data["lines"] for f in _lint(text)] == [[1, 2, 4]]


def test_the_step_through_a_scaler_is_the_line_the_run_reports():
    (finding,) = _lint(
        """\
        opt = torch.optim.AdamW(model.parameters())
        model.head = nn.Linear(2, 2)
        for x in loader:
            scaler.scale(model(x).sum()).backward()
            scaler.step(opt)
            scaler.update()
        """
    )
    assert finding.data["lines"] == [1, 2, 5]


def test_scopes_are_separate():
    text = """\
    class Lit:
        def configure_optimizers(self):
            self.opt = torch.optim.Adam(self.parameters())
            return self.opt

        def on_fit_start(self):
            self.head = nn.Linear(2, 2)
    """
    assert _lint(text) == []


def test_one_finding_per_insertion_even_with_several_optimizers():
    findings = _lint(
        """\
        opt_a = SGD(model.parameters())
        opt_b = Adam(model.parameters())
        model.fc = nn.Linear(2, 2)
        train(opt_a, opt_b)
        """
    )
    assert [(f.location.line, f.data["optimizer"]) for f in findings] == [(3, "opt_b")]


def test_a_long_statement_is_shortened_in_the_message():
    (finding,) = _lint(
        "opt = SGD(model.parameters())\nmodel.fc = nn.Sequential(\n    nn.Linear(512, 256), nn.ReLU(),\n"
        "    nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, 10),\n)\nopt.step()\n"
    )
    assert finding.message.startswith("`model.fc = nn.Sequential(nn.Linear(512, 256), nn.ReLU(), ...` (line 2)")
