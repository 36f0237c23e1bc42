"""Compression stages: one thin file per technique (``pqd.stages.<name>``, the names of
:data:`pqd.recipe.STAGE_SPECS`), each registering its ``apply(state, spec, ctx)``.

Importing this package fills ``pqd.registry.STAGES``.
"""

import importlib

from pqd.context import Context
from pqd.recipe import STAGE_NAMES
from pqd.state import MaskKeeper, State

for _name in STAGE_NAMES:  # registration
    importlib.import_module(f"pqd.stages.{_name}")

__all__ = ["Context", "MaskKeeper", "State"]
