"""GG404 frozen-norm-stats-updating."""

from __future__ import annotations

import weakref

import torch
from torch.nn.modules.batchnorm import _NormBase

from gradguard._frames import user_location
from gradguard.detector import Detector, Findings
from gradguard.findings import format_names

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
        out.append(buf._version if buf is not None else -1)
    return tuple(out)


def _frozen_versions(module: torch.nn.Module) -> tuple[int, ...] | None:
    """The version counters of the module's parameters if all are frozen, else ``None``."""
    out = []
    for p in module.parameters():
        if p.requires_grad:
            return None
        out.append(p._version)
    return tuple(out) if out else None


class FrozenNormStats(Detector):
    """GG404 frozen-norm-stats-updating: a frozen normalisation layer in train mode.

    **What it detects.** A batch or instance normalisation layer with running statistics
    (``BatchNorm1d/2d/3d``, ``SyncBatchNorm``, ``InstanceNorm*`` with
    ``track_running_stats=True``) whose affine parameters are all frozen, or that has none
    and sits in a module whose parameters are all frozen, but that is in train mode: each
    forward still overwrites ``running_mean`` and ``running_var``. ``requires_grad=False``
    stops gradients, not the statistics, which ``model.train()`` turns back on. gradguard
    watches the version counters of the running-stat buffers between steps, and reports a
    layer once its statistics changed over two steps while its parameters stayed frozen
    and unchanged (so a GAN discriminator frozen only during the generator's step, and
    trained in between, is not reported); no value is read.

    **Why it matters.** The frozen backbone is no longer the pretrained one: its
    statistics drift to the new data, often from small fine-tuning batches, while its
    weights stay put, and the accuracy of the frozen features degrades with no error.

    **How to fix it.** Put the frozen part in eval mode, and again after every
    ``model.train()`` (which switches every submodule back): override ``train()`` in your
    module, or call ``model.backbone.eval()`` at the start of each epoch. If you do want
    the statistics to adapt, leave the layer's affine parameters trainable or say so by
    ignoring this rule.

    **Example.**

    .. code-block:: python

        model.backbone.requires_grad_(False)
        model.train()                          # GG404: the backbone's BatchNorm still updates
        # fix: model.train(); model.backbone.eval()
    """

    code = "GG404"
    name = "frozen-norm-stats-updating"
    hint = "Call .eval() on the frozen part after each model.train() (e.g. model.backbone.eval())"
    events = frozenset({"model", "step"})
    state_fields = ("flagged",)

    def setup(self) -> None:
        self.flagged: list[str] = []
        self._norms: list[_Norm] = []
        self._seen: set[int] = set()

    def teardown(self) -> None:
        self._norms.clear()
        self._seen.clear()

    def on_model(self, module: torch.nn.Module) -> Findings:
        parents: dict[str, torch.nn.Module] = {}
        for name, sub in module.named_modules(remove_duplicate=True):
            parents[name] = sub
            if not isinstance(sub, _NormBase) or id(sub) in self._seen:
                continue
            if not sub.track_running_stats or sub._buffers.get("num_batches_tracked") is None:
                continue  # no running statistics to update
            self._seen.add(id(sub))
            owner: torch.nn.Module | None = sub
            if next(sub.parameters(recurse=False), None) is None:
                owner = _enclosing_with_params(name, parents)
            self._norms.append(_Norm(sub, name, owner))
        return None

    def on_step(self) -> Findings:
        updated: list[str] = []
        dead = False
        for norm in self._norms:
            module = norm.ref()
            if module is None:
                dead = True
                continue
            versions = _versions(module)
            if versions == norm.versions:
                continue
            norm.versions = versions
            if not module.training or norm.name in self.flagged:
                norm.pending = None
                continue  # changed through a forward in train mode that eval() since ended
            owner = norm.owner() if norm.owner is not None else None
            frozen = _frozen_versions(owner) if owner is not None else None
            if frozen is not None and frozen == norm.pending:
                updated.append(norm.name)
            norm.pending = frozen
        if dead:
            self._norms = [n for n in self._norms if n.ref() is not None]
        if not updated:
            return None
        self.flagged.extend(updated)
        message = (
            f"{len(updated)} normalisation layer(s) with frozen parameters are in train mode, and their "
            f"running statistics changed during this step: {format_names(updated)}"
        )
        return [
            self.finding(
                message,
                where=format_names(updated),
                location=user_location(),
                data={"modules": updated[:100], "num_modules": len(updated)},
            )
        ]


def _enclosing_with_params(name: str, modules: dict[str, torch.nn.Module]) -> torch.nn.Module | None:
    """The nearest enclosing module of ``name`` that has parameters (below the root)."""
    parts = name.split(".")
    for end in range(len(parts) - 1, 0, -1):
        parent = modules.get(".".join(parts[:end]))
        if parent is not None and next(parent.parameters(), None) is not None:
            return parent
    return None
