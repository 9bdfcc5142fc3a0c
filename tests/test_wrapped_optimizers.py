"""Wrapped optimizers (Accelerate's, Lightning's, anyone's) are watched as the optimizer they wrap."""

import json

import pytest
import torch
from torch import nn

import gradguard
from gradguard import ConfigurationError, Guard
from gradguard.guard import active_guards
from gradguard.run import find_optimizer, unwrap_optimizer
from tests.helpers import line_of, tiny_data, tiny_model

accelerate = pytest.importorskip("accelerate")


class Holder:
    """A wrapper gradguard knows nothing of: it keeps the optimizer under a name of its own."""

    def __init__(self, inner):
        self.inner = inner
        self.lr_scale = 1.0

    def step(self):
        self.inner.step()


class Wrapper:
    """A wrapper that keeps what it wraps (an optimizer or another wrapper) as ``optimizer``, as Accelerate's does."""

    def __init__(self, optimizer):
        self.optimizer = optimizer


class NotSetUp(torch.optim.Optimizer):
    """An optimizer class whose __init__ never calls torch.optim.Optimizer.__init__, and that holds nothing."""

    def __init__(self, params):
        self.params = list(params)


def _sgd(model=None):
    model = model if model is not None else tiny_model()
    return torch.optim.SGD(model.parameters(), lr=0.1)


@pytest.fixture
def accelerator():
    """A CPU ``Accelerator`` factory; Accelerate's process-wide state is reset around each test."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(True)
        GradientState._reset_state()

    reset()
    yield lambda steps=1: accelerate.Accelerator(cpu=True, gradient_accumulation_steps=steps)
    reset()


# ---------------------------------------------------------------------------------------- unwrapping


def test_an_optimizer_is_itself_and_wrappers_give_the_one_they_wrap(accelerator):
    from lightning.pytorch.core.optimizer import LightningOptimizer

    opt = _sgd()
    prepared = accelerator().prepare(opt)
    assert type(prepared).__name__ == "AcceleratedOptimizer"
    assert find_optimizer(opt) is opt
    assert find_optimizer(prepared) is opt
    assert find_optimizer(LightningOptimizer(opt)) is opt
    assert find_optimizer(Holder(opt)) is opt  # the one attribute that holds an optimizer
    assert find_optimizer(Holder(LightningOptimizer(prepared))) is opt  # wrappers of wrappers
    assert find_optimizer(Wrapper(Wrapper(prepared))) is opt
    assert find_optimizer(torch.optim.lr_scheduler.StepLR(opt, 1)) is opt  # a scheduler exposes its optimizer


def test_unwrapping_is_bounded_and_never_runs_the_objects_own_lookup():
    opt = _sgd()
    deep: object = opt
    for _ in range(4):
        deep = Wrapper(deep)
    assert find_optimizer(deep) is opt
    assert find_optimizer(Wrapper(deep)) is None  # five wrappers deep: not followed
    assert find_optimizer(Holder(Holder(opt))) is None  # another name is followed only to an optimizer

    looped = Wrapper(None)
    looped.optimizer = Wrapper(looped)
    assert find_optimizer(looped) is None

    class Proxy:
        __slots__ = ()

        def __getattr__(self, name):
            raise RuntimeError(f"{name} looked up")

    assert find_optimizer(Proxy()) is None
    assert find_optimizer(torch.optim.SGD) is None  # a class, not an optimizer


def test_what_cannot_be_unwrapped_is_a_configuration_error_naming_argument_type_and_accepted():
    with pytest.raises(ConfigurationError, match=r"^Expected optimizer to be a torch\.optim\.Optimizer") as info:
        unwrap_optimizer(Holder(None))
    message = str(info.value)
    assert "AcceleratedOptimizer" in message
    assert "LightningOptimizer" in message
    assert message.endswith("but got tests.test_wrapped_optimizers.Holder")

    two = Holder(_sgd())
    two.other = _sgd()
    with pytest.raises(ConfigurationError, match=r"holds several optimizers \(inner, other\)"):
        unwrap_optimizer(two, "optimizer")
    with pytest.raises(ConfigurationError, match=r"never called torch\.optim\.Optimizer\.__init__"):
        unwrap_optimizer(NotSetUp(tiny_model().parameters()))


def test_guard_rejects_a_wrapper_it_cannot_understand_before_anything_is_attached():
    model = tiny_model()
    hooks = [len(model._forward_pre_hooks), len(model._forward_hooks)]
    with pytest.raises(ConfigurationError, match=r"^Expected optimizer to be .*, or a list of them but got tests\."):
        Guard(model, Holder(None))
    with pytest.raises(ConfigurationError, match=r"^Expected every optimizer to be .* but got float"):
        Guard(model, [_sgd(model), 0.1])
    with pytest.raises(ConfigurationError, match=r"never called torch\.optim\.Optimizer\.__init__"):
        Guard(model, NotSetUp(model.parameters()))
    assert active_guards() == []
    assert [len(model._forward_pre_hooks), len(model._forward_hooks)] == hooks


def test_guard_and_add_optimizer_watch_the_wrapped_optimizer(accelerator):
    from lightning.pytorch.core.optimizer import LightningOptimizer

    model = tiny_model()
    first, second = _sgd(model), _sgd(model)
    prepared = accelerator().prepare(first)
    guard = Guard(model, [prepared, Holder(first)], policy="collect")
    assert guard.optimizers() == [first]
    with guard:
        assert len(first._optimizer_step_pre_hooks) == 1
        guard.add_optimizer(LightningOptimizer(second))
        with pytest.raises(ConfigurationError, match="but got str"):
            guard.add_optimizer("sgd")
        assert guard.optimizers() == [first, second]
        assert len(second._optimizer_step_pre_hooks) == 1
    assert len(first._optimizer_step_pre_hooks) == len(second._optimizer_step_pre_hooks) == 0


# ---------------------------------------------------------------------------------------- Accelerate loops


class Trainer:
    """How Accelerate loops are often written: the prepared objects held on ``self``."""

    def __init__(self, accelerator, batches=12, batch_size=4):
        self.accelerator = accelerator
        model = tiny_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        x, y = tiny_data(batches * batch_size)
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4)
        self.model, self.optimizer, self.loader, self.scheduler = accelerator.prepare(
            model, optimizer, loader, scheduler
        )

    def fit(self, epochs=2, reset=True, losses=None):
        for _ in range(epochs):
            for x, y in self.loader:
                with self.accelerator.accumulate(self.model):
                    loss = nn.functional.mse_loss(self.model(x), y)
                    self.accelerator.backward(loss)
                    self.optimizer.step()  # step of the accelerate loop
                    self.scheduler.step()
                    if reset:
                        self.optimizer.zero_grad()
                    if losses is not None:
                        losses.append(loss)  # kept with its graph

    def real_steps(self):
        """Steps that reached AdamW (Accelerate skips the others inside an accumulation window)."""
        return int(next(iter(self.optimizer.optimizer.state.values()))["step"])


@pytest.mark.parametrize("steps", [1, 3])
def test_a_correct_accelerate_loop_gives_no_finding(accelerator, steps):
    trainer = Trainer(accelerator(steps))
    assert type(trainer.optimizer).__name__ == "AcceleratedOptimizer"
    with Guard(trainer.model, trainer.optimizer, policy="collect") as guard:
        assert guard.optimizers() == [trainer.optimizer.optimizer]
        trainer.fit()
    assert guard.findings == []
    assert guard.step == trainer.real_steps()  # the steps Accelerate skipped are none
    assert guard.step == (24 if steps == 1 else 8)


@pytest.mark.parametrize("steps", [1, 3])
def test_an_accelerate_loop_without_zero_grad_gives_gg101(accelerator, steps):
    trainer = Trainer(accelerator(steps))
    with Guard(trainer.model, trainer.optimizer, policy="collect") as guard:
        trainer.fit(reset=False)
    assert [f.code for f in guard.findings] == ["GG101"]
    assert guard.findings[0].location.line == line_of("# step of the accelerate loop")
    assert "AdamW" in guard.findings[0].message


def test_the_inner_optimizer_gives_no_gg000_and_gg201_keeps_working(accelerator):
    # the prepared scheduler holds the AcceleratedOptimizer: found in the loop's frames at the first steps
    trainer = Trainer(accelerator(2))
    with Guard(trainer.model, trainer.optimizer.optimizer, policy="collect") as guard:
        trainer.fit()
    assert guard.findings == []
    assert guard.step == trainer.real_steps()

    trainer = Trainer(accelerator(2))
    losses: list[torch.Tensor] = []
    with Guard(trainer.model, trainer.optimizer.optimizer, policy="collect") as leaky:
        trainer.fit(losses=losses)
    assert [f.code for f in leaky.findings] == ["GG201"]
    assert leaky.findings[0].location.line == line_of("# kept with its graph")
    assert "losses" in leaky.findings[0].message


def test_install_watches_an_accelerate_loop_through_the_optimizer_it_wraps(accelerator):
    trainer = Trainer(accelerator(3))
    guard = gradguard.install(policy="collect")
    try:
        trainer.fit(reset=False)
        assert guard.optimizers() == [trainer.optimizer.optimizer]
    finally:
        gradguard.uninstall()
    assert [f.code for f in guard.findings] == ["GG101"]
    assert guard.step == trainer.real_steps() == 8


SCRIPT = """
    import accelerate
    import torch
    from torch import nn

    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    data = torch.utils.data.TensorDataset(torch.randn(40, 4), torch.randn(40, 1))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=4)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    for epoch in range(2):
        for x, y in loader:
            with accelerator.accumulate(model):
                loss = nn.functional.mse_loss(model(x), y)
                accelerator.backward(loss)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
    print("steps", int(next(iter(optimizer.optimizer.state.values()))["step"]))
"""


def test_gradguard_run_watches_an_accelerate_script(write_script, run_cli, tmp_path):
    script = write_script(SCRIPT)
    proc = run_cli("run", "--json", "out.json", str(script))
    assert proc.returncode == 0, proc.stderr
    report = json.loads((tmp_path / "out.json").read_text())
    assert report["findings"] == []
    assert f"steps {report['summary']['steps']}\n" in proc.stdout
    assert report["summary"]["steps"] == 10  # 10 batches an epoch, two to a step


def test_a_module_is_no_wrapper_and_its_globals_are_not_read():
    # torch.distributed holds a deprecated object whose reading warns (an error under -W error)
    import torch.distributed as dist

    from gradguard.run import find_optimizer

    assert find_optimizer(dist) is None
    assert find_optimizer(torch) is None
