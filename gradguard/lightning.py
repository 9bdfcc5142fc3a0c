"""The Lightning integration: ``GradGuardCallback`` and ``AccumulationCallback``.

Needs the ``[lightning]`` extra: ``pip install 'gradguard[lightning]'``.
"""

from gradguard.integrations.lightning import GradGuardCallback
from gradguard.integrations.lightning_accumulation import AccumulationCallback

__all__ = ["AccumulationCallback", "GradGuardCallback"]
