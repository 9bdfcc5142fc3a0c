"""Optimizer steps: ``StepPre`` and ``StepPost`` events, through torch's optimizer step hooks.

A guard given its optimizers hooks each of them; ``gradguard run`` uses the global
optimizer hooks and adopts every optimizer at its first step. Either way, at the first two
steps the user's frames are searched for optimizers the loop holds but has not stepped yet
(a GAN's second optimizer, a wrapper's inner optimizer), so that the step counter knows
every optimizer of the loop before it steps. A wrapper (Accelerate's ``AcceleratedOptimizer``,
Lightning's ``LightningOptimizer``) is watched as the optimizer it wraps
(:func:`~gradguard.run.find_optimizer`): its steps are the ones that reach that optimizer,
so a step Accelerate skips inside a gradient accumulation window is no step. An
optimizer's hooks are not part of its ``state_dict`` or pickled state, so nothing of
gradguard travels with it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim import optimizer as optimizer_mod
from torch.utils.hooks import RemovableHandle

from gradguard.events import StepPost, StepPre
from gradguard.introspect.frames import frame_variables, user_frames
from gradguard.run import find_optimizer
from gradguard.sources.base import Hooks, Hub, Source

_DISCOVER_STEPS = 2
_is_compiling = torch.compiler.is_compiling


#: The optimizer an object is, or wraps: :func:`gradguard.run.find_optimizer`, under the name sources import.
inner_optimizer = find_optimizer


class OptimizerSource(Source):
    """Step events of the watched optimizers; with ``global_hooks``, of every optimizer."""

    provides = (StepPre, StepPost)
    always = True

    def __init__(self, hub: Hub, global_hooks: bool = False) -> None:
        super().__init__(hub)
        self.global_hooks = global_hooks
        self._hooks = Hooks()
        self._global: list[RemovableHandle] = []
        self._steps = 0

    def start(self) -> None:
        if self.global_hooks:
            self._global.append(optimizer_mod.register_optimizer_step_pre_hook(self._pre))
            self._global.append(optimizer_mod.register_optimizer_step_post_hook(self._post))

    def stop(self) -> None:
        for handle in self._global:
            handle.remove()
        self._global.clear()
        self._hooks.remove_all()

    def watch(self, optimizer: torch.optim.Optimizer) -> None:
        """Hook one optimizer (with the global hooks in place, nothing to do)."""
        if self.global_hooks:
            return
        if optimizer in self._hooks:
            return
        pre = optimizer.register_step_pre_hook(self._pre)
        try:
            post = optimizer.register_step_post_hook(self._post)
        except BaseException:
            pre.remove()
            raise
        self._hooks.add(optimizer, [pre, post])

    def _pre(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if _is_compiling():
            return
        if self.global_hooks:
            if find_optimizer(optimizer) is not optimizer:
                return  # a wrapper whose step() hooks fire too: the optimizer it wraps reports its own step
            self.hub.add_optimizer(optimizer)
        if self._steps < _DISCOVER_STEPS:
            self._discover()
        self.hub.step_pre(optimizer)

    def _post(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if _is_compiling():
            return
        if self.global_hooks and find_optimizer(optimizer) is not optimizer:
            return
        self._steps += 1
        self.hub.step_post(optimizer)

    def _discover(self) -> None:
        """Adopt the optimizers the user's frames hold (variables, and attributes of ``self``)."""
        try:
            for frame in user_frames(8, installed=False):
                for name, value in frame_variables(frame):
                    candidates = [value]
                    if name == "self" and not isinstance(value, torch.nn.Module):
                        candidates = list(getattr(value, "__dict__", {}).values())
                    for obj in candidates:
                        opt = find_optimizer(obj)
                        if opt is not None:
                            self.hub.add_optimizer(opt)
        except Exception as exc:
            self.hub.source_failed(self, exc)
