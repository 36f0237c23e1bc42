"""Compression stages: one file per technique, each registered by name.

Importing this package fills ``pqd.registry.STAGES``.
"""

from pqd.stages import (  # noqa: F401  (registration)
    distill,
    early_exit,
    prune,
    prune_channels,
    quantize,
)
from pqd.stages.base import Context, MaskKeeper, State

__all__ = ["Context", "MaskKeeper", "State"]
