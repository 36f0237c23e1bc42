"""Make torchao's PT2E prepare/convert/train-eval switches cheap: trace each pattern once.

torchao 0.18 re-traces its small rewrite patterns with ``torch.export`` on every call:
``convert_pt2e`` traces 108 of them (conv1d, conv2d, conv_transpose1d/2d x 12 variants x
match/replacement), ``prepare_qat_pt2e`` about 20, and every ``move_exported_model_to_eval``
/ ``_train`` a few more. At ~0.15-0.3 s per trace here that was 15 s per convert and 6 s
per prepare even for a 3-conv net, paid again by every export and every train/eval switch.

:func:`install` (idempotent) wraps two private torchao functions:

- ``_get_aten_graph_module_for_pattern`` is memoised on what defines the traced graph (the
  pattern's code, its closure values, the example inputs' shapes and dtypes, ``is_cuda``,
  the kwargs); each call returns a deep copy, so the rewriter can never alter the cache;
- the conv-BN fuse/fold helpers skip a conv kind (e.g. ``conv_transpose1d``) absent from the
  graph, where they could match nothing anyway.

Measured here on tiny_cnn: convert 15.5 s -> 0.3 s after the first call in a process (the
first convert of a process still traces the conv2d patterns once, ~3 s). When the private
names are missing (another torchao), nothing is patched and torchao runs as it is.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Hashable
from typing import Any

import torch
import torch.nn.functional as F

_installed = False
_CONV_OPS: dict[Callable[..., Any], set[Any]] = {}


def _describe(value: Any) -> Hashable:
    """A hashable description of an example input or kwarg (tensors by shape/dtype/device)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, value.device.type)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, *(_describe(v) for v in value))
    if isinstance(value, dict):
        return ("dict", *sorted((k, _describe(v)) for k, v in value.items()))
    hash(value)
    return value


def _pattern_key(pattern: Any) -> Hashable:
    """What decides the traced graph of ``pattern``: its function's code and closure values."""
    fn = getattr(pattern, "fn", pattern)  # torchao's WrapperModule keeps the function in .fn
    code = getattr(fn, "__code__", None)
    if code is None:
        raise TypeError("not a plain function")
    cells = tuple(_describe(c.cell_contents) for c in (fn.__closure__ or ()))
    defaults = tuple(_describe(d) for d in (fn.__defaults__ or ()))
    return (type(pattern), code, cells, defaults)


def _memoised(trace: Callable[..., torch.fx.GraphModule]) -> Callable[..., torch.fx.GraphModule]:
    cache: dict[Hashable, torch.fx.GraphModule] = {}

    @functools.wraps(trace)
    def wrapper(
        pattern: Any, example_inputs: tuple[Any, ...], is_cuda: bool = False, **kwargs: Any
    ) -> torch.fx.GraphModule:
        try:
            key = (
                _pattern_key(pattern),
                _describe(tuple(example_inputs)),
                is_cuda,
                _describe(kwargs),
            )
        except TypeError:  # something unhashable: trace as torchao would
            return trace(pattern, example_inputs, is_cuda, **kwargs)
        if key not in cache:
            cache[key] = trace(pattern, example_inputs, is_cuda, **kwargs)
        return copy.deepcopy(cache[key])

    wrapper.cache = cache  # type: ignore[attr-defined]
    return wrapper


def _skip_absent_convs(helper: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(helper)
    def wrapper(
        m: torch.fx.GraphModule, conv_fn: Callable[..., Any], *args: Any, **kwargs: Any
    ) -> Any:
        ops = _CONV_OPS.get(conv_fn)
        if ops is not None and not any(
            n.op == "call_function" and n.target in ops for n in m.graph.nodes
        ):
            return m
        return helper(m, conv_fn, *args, **kwargs)

    return wrapper


def install() -> bool:
    """Patch torchao's PT2E pattern tracing (once per process); True when patched."""
    global _installed
    if _installed:
        return True
    try:
        from torchao.quantization.pt2e import qat_utils, utils
    except ImportError:
        return False
    names = ("_fuse_conv_bn_qat_helper", "_fold_conv_bn_qat_helper")
    if not hasattr(utils, "_get_aten_graph_module_for_pattern") or not all(
        hasattr(qat_utils, n) for n in names
    ):
        return False
    aten = torch.ops.aten
    _CONV_OPS.update(
        {
            F.conv1d: {aten.conv1d.default, aten.conv1d.padding},
            F.conv2d: {aten.conv2d.default, aten.conv2d.padding},
            F.conv_transpose1d: {aten.conv_transpose1d.default},
            F.conv_transpose2d: {aten.conv_transpose2d.input},
        }
    )
    traced = _memoised(utils._get_aten_graph_module_for_pattern)
    utils._get_aten_graph_module_for_pattern = traced
    qat_utils._get_aten_graph_module_for_pattern = traced
    for name in names:
        setattr(qat_utils, name, _skip_absent_convs(getattr(qat_utils, name)))
    _installed = True
    return True
