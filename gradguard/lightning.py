"""``from gradguard.lightning import GradGuardCallback``: the Lightning integration.

Needs the ``[lightning]`` extra: ``pip install 'gradguard[lightning]'``.
"""

from gradguard.integrations.lightning import GradGuardCallback

__all__ = ["GradGuardCallback"]
