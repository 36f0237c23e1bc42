"""Compression stages: one file per technique, each registered by name.

Importing this package fills ``pqd.registry.STAGES``.
"""

from pqd.stages import distill, prune, prune_channels, quantize  # noqa: F401  (registration)
from pqd.stages.base import Context, MaskKeeper, State

__all__ = ["Context", "MaskKeeper", "State"]
