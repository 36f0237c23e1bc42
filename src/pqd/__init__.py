"""pqd: ordered compression pipelines judged by the deployed artifact.

The Python API (the CLI's ``pqd run`` goes through the same functions)::

    import pqd
    result = pqd.compress(model, {"train": (x, y), "test": (xt, yt)},
                          stages=[pqd.Prune(sparsity=0.5, epochs=2),
                                  pqd.Quantize(epochs=1), pqd.Distill(epochs=1)])
    result.record["final"]["accuracy"], result.final_onnx, result.model.eval()
    state = pqd.apply_stages(model, stages, data)      # no export, no measurement

- :func:`compress` (:mod:`pqd.api`): stages -> ONNX export -> measurement, into a run folder.
- :func:`export`, :func:`measure`, :func:`torch_model` (:mod:`pqd.artifact`): a model or
  state to one ONNX file; a file measured on test images (the entries of ``record.json``);
  the torch module a file reproduces.
- :func:`apply_stages` (:mod:`pqd.engine`): the stage loop alone; returns the
  :class:`~pqd.stages.State` (model, masks, quantized flag, per-stage info).
- :func:`baseline`: train a model or load a checkpoint into it.
- :func:`plan` (:mod:`pqd.api`, :mod:`pqd.planner`): the most accurate model under a
  latency budget on this CPU, from a measured latency model (``pqd plan``), for a recipe or
  a model in memory.
- ``Prune``, ``PruneChannels``, ``Quantize``, ``Distill``, ``EarlyExit``: the stage configs,
  the very classes a recipe's ``stages:`` entries are validated into.
- ``TrainSpec``, ``ExportSpec``, ``MeasureSpec``: the recipe's ``train``, ``export`` and
  ``measure`` sections.

Names are imported on first use, so ``import pqd`` stays light.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from pqd._version import __version__

_LAZY = {
    "compress": ("pqd.api", "compress"),
    "export": ("pqd.artifact", "export"),
    "measure": ("pqd.artifact", "measure"),
    "torch_model": ("pqd.artifact", "torch_model"),
    "CompressResult": ("pqd.api", "CompressResult"),
    "plan": ("pqd.api", "plan"),
    "apply_stages": ("pqd.engine", "apply_stages"),
    "baseline": ("pqd.engine", "baseline"),
    "State": ("pqd.state", "State"),
    "Prune": ("pqd.recipe", "PruneSpec"),
    "PruneChannels": ("pqd.recipe", "PruneChannelsSpec"),
    "Quantize": ("pqd.recipe", "QuantizeSpec"),
    "Distill": ("pqd.recipe", "DistillSpec"),
    "EarlyExit": ("pqd.recipe", "EarlyExitSpec"),
    "TrainSpec": ("pqd.recipe", "TrainSpec"),
    "ExportSpec": ("pqd.recipe", "ExportSpec"),
    "MeasureSpec": ("pqd.recipe", "MeasureSpec"),
}
_SUBMODULES = ("data",)

__all__ = [  # noqa: RUF022  (grouped as documented)
    "__version__",
    "compress",
    "CompressResult",
    "export",
    "measure",
    "torch_model",
    "plan",
    "apply_stages",
    "baseline",
    "State",
    "Prune",
    "PruneChannels",
    "Quantize",
    "Distill",
    "EarlyExit",
    "TrainSpec",
    "ExportSpec",
    "MeasureSpec",
    "data",
]

if TYPE_CHECKING:
    from pqd import data
    from pqd.api import CompressResult, compress, plan
    from pqd.artifact import export, measure, torch_model
    from pqd.engine import apply_stages, baseline
    from pqd.recipe import DistillSpec as Distill
    from pqd.recipe import EarlyExitSpec as EarlyExit
    from pqd.recipe import ExportSpec, MeasureSpec, TrainSpec
    from pqd.recipe import PruneChannelsSpec as PruneChannels
    from pqd.recipe import PruneSpec as Prune
    from pqd.recipe import QuantizeSpec as Quantize
    from pqd.state import State


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module), attr)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"pqd.{name}")
    else:
        raise AttributeError(f"module 'pqd' has no attribute {name!r}")
    globals()[name] = value
    return value
