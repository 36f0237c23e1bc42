"""Build torch's ONNX function registry once per process, not once per exported file.

``torch.onnx.export`` (the dynamo exporter) builds an ``ONNXRegistry`` from onnxscript's
torchlib on every call: about a thousand ONNX functions, each parsed from its Python source
again (onnxscript's ``function_ir`` is a property that re-reads and re-parses the source).
For the small files pqd writes (two per run, one per piece of a latency table, one per
early-exit segment) that was the largest single part of an export (docs/install.md#caches
has the figures).

:func:`install` (idempotent) memoises the private classmethod
``ONNXRegistry.from_torchlib`` per opset version and set of torch ops registered at the
time (the registry leaves out functions whose op is not loaded yet: torchao's
``quantized_decomposed`` ops load after the first float export of a process). Each call
gets a registry of its own whose lists are copies of the cached one's (an export that
registers custom ops, as ``custom_translation_table`` does, changes only its copy); the
function entries themselves are shared, and nothing in an export writes to them. When the
private name is missing (another torch), nothing is patched and torch runs as it is.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

_installed = False


def install() -> bool:
    """Memoise the exporter's registry (once per process); True when patched."""
    global _installed
    if _installed:
        return True
    try:
        from torch.onnx._internal.exporter import _registration
    except ImportError:
        return False
    cls = getattr(_registration, "ONNXRegistry", None)
    build = getattr(cls, "from_torchlib", None)
    if cls is None or build is None or not hasattr(cls(), "functions"):
        return False
    if not hasattr(torch._C, "_dispatch_get_all_op_names"):
        return False
    params = inspect.signature(build).parameters
    if list(params) != ["opset_version"]:
        return False
    default = params["opset_version"].default
    built: dict[tuple[type, Any, frozenset[str]], Any] = {}

    @functools.wraps(build)
    def from_torchlib(klass: type, opset_version: Any = default) -> Any:
        # the registry holds the torchlib functions whose torch op exists when it is built:
        # a library loaded since (torchao's quantized_decomposed ops) needs a new build
        ops = frozenset(torch._C._dispatch_get_all_op_names())
        key = (klass, opset_version, ops)
        if key not in built:
            built[key] = build.__func__(klass, opset_version)
        cached = built[key]
        fresh = klass()
        fresh._opset_version = cached._opset_version
        fresh.functions = {name: list(metas) for name, metas in cached.functions.items()}
        return fresh

    from_torchlib.built = built  # type: ignore[attr-defined]
    cls.from_torchlib = classmethod(from_torchlib)
    _installed = True
    return True
