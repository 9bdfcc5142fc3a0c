"""GG404 frozen-norm-stats-updating."""

from __future__ import annotations

import weakref

import torch
from torch.nn.modules.batchnorm import _NormBase

from gradguard.detector import Detector, Findings, on
from gradguard.events import StepEnd
from gradguard.findings import Finding, format_names
from gradguard.introspect.dtensor import version
from gradguard.introspect.frames import user_location
from gradguard.sampling import Rotation

_STATS = ("running_mean", "running_var", "num_batches_tracked")


class _Norm:
    """One normalisation layer with running statistics, held weakly."""

    __slots__ = ("name", "owner", "pending", "ref", "versions")

    def __init__(self, module: _NormBase, name: str, owner: torch.nn.Module | None) -> None:
        self.ref = weakref.ref(module)
        self.name = name
        # the module whose parameters decide "frozen": the layer itself when it has
        # affine parameters, else the nearest enclosing module that has parameters
        self.owner = weakref.ref(owner) if owner is not None else None
        self.versions = _versions(module)
        # the owner's parameter versions when the stats were first seen changing while
        # frozen: reported if the parameters are still frozen and unchanged next time
        self.pending: tuple[int, ...] | None = None


def _versions(module: torch.nn.Module) -> tuple[int, ...]:
    out = []
    for key in _STATS:
        buf = module._buffers.get(key)
        out.append(version(buf) if buf is not None else -1)
    return tuple(out)


def _frozen_versions(module: torch.nn.Module) -> tuple[int, ...] | None:
    """The version counters of the module's parameters if all are frozen, else ``None``."""
    out = []
    for p in module.parameters():
        if p.requires_grad:
            return None
        out.append(version(p))
    return tuple(out) if out else None


class FrozenNormStats(Detector):
    """GG404 frozen-norm-stats-updating: a frozen normalisation layer in train mode.

    **What it detects.** A batch or instance normalisation layer with running statistics
    (`BatchNorm1d/2d/3d`, `SyncBatchNorm`, `InstanceNorm*` with
    `track_running_stats=True`) whose affine parameters are all frozen, or that has none
    and sits in a module whose parameters are all frozen, but that is in train mode: each
    forward still overwrites `running_mean` and `running_var`. `requires_grad=False`
    stops gradients, not the statistics, which `model.train()` turns back on. gradguard
    watches the version counters of the running-stat buffers between steps (of every such
    layer during the first steps, then of a rotating few), and reports a layer once its
    statistics changed over two looks while its parameters stayed frozen and unchanged
    (so a GAN discriminator frozen only during the generator's step, and trained in
    between, is not reported); no value is read.

    **Why it matters.** The frozen backbone is no longer the pretrained one: its
    statistics drift to the new data, often from small fine-tuning batches, while its
    weights stay put, and the accuracy of the frozen features degrades with no error.

    **How to fix it.** Put the frozen part in eval mode, and again after every
    `model.train()` (which switches every submodule back): override `train()` in your
    module, or call `model.backbone.eval()` at the start of each epoch. If you do want
    the statistics to adapt, leave the layer's affine parameters trainable or say so by
    ignoring this rule.

    **Example.**

    ```python
    model.backbone.requires_grad_(False)
    model.train()                          # GG404: the backbone's BatchNorm still updates
    # fix: model.train(); model.backbone.eval()
    ```
    """

    code = "GG404"
    name = "frozen-norm-stats-updating"
    hint = "Call .eval() on the frozen part after each model.train() (e.g. model.backbone.eval())"
    consumes = (StepEnd,)
    every = 4
    state_fields = ("flagged",)

    def setup(self) -> None:
        self.flagged: list[str] = []
        self._found: set[str] = set()  # flagged in this run (a resumed run reports again what still happens)
        self._norms: dict[int, _Norm] = {}
        self._list: list[_Norm] = []
        self._structure = -1
        self._rotation = Rotation(self.run.budget.wide())

    def teardown(self) -> None:
        self._norms.clear()
        self._list = []

    def _refresh(self) -> None:
        """The norm layers with running statistics of every model (when the models changed)."""
        norms: dict[int, _Norm] = {}
        for model in self.run.models():
            parents: dict[str, torch.nn.Module] = {}
            for name, sub in model.named_modules(remove_duplicate=True):
                parents[name] = sub
                if not isinstance(sub, _NormBase) or id(sub) in norms:
                    continue
                if not sub.track_running_stats or sub._buffers.get("num_batches_tracked") is None:
                    continue  # no running statistics to update
                known = self._norms.get(id(sub))
                if known is not None and known.ref() is sub:
                    norms[id(sub)] = known
                    continue
                owner: torch.nn.Module | None = sub
                if next(sub.parameters(recurse=False), None) is None:
                    owner = _enclosing_with_params(name, parents)
                norms[id(sub)] = _Norm(sub, name, owner)
        self._norms = norms
        self._list = list(norms.values())
        self._structure = self.run.structure

    @on(StepEnd)
    def _step(self, event: StepEnd) -> Findings:
        if self._structure != self.run.structure:
            self._refresh()
        updated: list[str] = []
        for norm in self._rotation.select([self._list], event.step):
            module = norm.ref()
            if module is None:
                continue
            versions = _versions(module)
            if versions == norm.versions:
                continue
            norm.versions = versions
            if not module.training or norm.name in self._found:
                norm.pending = None
                continue  # changed through a forward in train mode that eval() since ended
            owner = norm.owner() if norm.owner is not None else None
            frozen = _frozen_versions(owner) if owner is not None else None
            if frozen is not None and frozen == norm.pending:
                updated.append(norm.name)
            norm.pending = frozen
        if not updated:
            return None
        self._found.update(updated)
        self.flagged.extend(n for n in updated if n not in self.flagged)

        def build(names: list[str]) -> Finding:
            message = (
                f"{len(names)} normalisation layer(s) with frozen parameters are in train mode, and their "
                f"running statistics changed during this step: {format_names(names)}"
            )
            data = {"modules": names[:100], "num_modules": len(names)}
            return self.finding(message, where=format_names(names), location=user_location(), data=data)

        return [self.grow("frozen-norms", updated, build)]


def _enclosing_with_params(name: str, modules: dict[str, torch.nn.Module]) -> torch.nn.Module | None:
    """The nearest enclosing module of ``name`` that has parameters (below the root)."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        parent = modules.get(".".join(parts[:end]))
        if parent is not None and next(parent.parameters(), None) is not None:
            return parent
    return None
