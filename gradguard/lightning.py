"""The Lightning integration: ``GradGuardCallback`` and ``AccumulationCallback``.

Needs the ``[lightning]`` extra: ``pip install 'gradguard[lightning]'``.
"""

try:
    import lightning.pytorch  # noqa: F401
except ModuleNotFoundError as exc:  # pragma: no cover - exercised in a subprocess test
    if exc.name not in ("lightning", "lightning.pytorch"):
        raise
    raise ModuleNotFoundError(
        "gradguard.lightning needs Lightning, which is not installed: pip install 'gradguard[lightning]'",
        name=exc.name,
    ) from exc

from gradguard.integrations.lightning import GradGuardCallback
from gradguard.integrations.lightning_accumulation import AccumulationCallback

__all__ = ["AccumulationCallback", "GradGuardCallback"]
