"""The torchao pattern-trace cache: same graphs as a fresh trace, keyed on what matters."""

from __future__ import annotations

import copy

import torch

from pqd.export import int8_model
from pqd.pt2e_patterns import _CACHE, _key, install
from pqd.stages.quantize import DEFAULT_SCHEME, calibrate, prepare_qat
from pqd.train import eval_mode
from quant_helpers import tiny


def test_cached_pattern_equals_a_fresh_trace() -> None:
    assert install()
    from torchao.quantization.pt2e import qat_utils, utils

    cached = utils._get_aten_graph_module_for_pattern
    assert qat_utils._get_aten_graph_module_for_pattern is cached
    fresh = cached.__wrapped__
    conv = torch.nn.functional.conv2d
    pattern = qat_utils._get_quantized_qat_conv_bn_pattern(True, True, False, conv, True)
    # torchao's example inputs for quantized conv-bn patterns (x, conv w, bn w/b/mean/var)
    inputs = (torch.randn(1, 1, 3, 3), torch.randn(1, 1, 1, 1), *(torch.randn(1),) * 4)
    kwargs = qat_utils._get_quantized_conv_bn_example_inputs_kwargs(True, True, False, False)
    a = cached(pattern, inputs, False, **kwargs)
    b = cached(pattern, inputs, False, **kwargs)
    c = fresh(pattern, inputs, False, **kwargs)
    assert a is not b and a.code == b.code == c.code  # copies of one trace, as traced
    assert _key(pattern, inputs, False, kwargs) in _CACHE
    other = qat_utils._get_quantized_qat_conv_bn_pattern(False, True, False, conv, True)
    assert _key(other, inputs, False, kwargs) != _key(pattern, inputs, False, kwargs)


def test_converted_model_matches_the_fake_quant_model() -> None:
    """convert_pt2e folds BN into the int8 conv weights with cached patterns: the INT8
    model computes what the fake-quant graph computed."""
    scheme = {**copy.deepcopy(DEFAULT_SCHEME), "mode": "ptq"}
    graph = prepare_qat(tiny(seed=9), torch.rand(2, 3, 32, 32), scheme)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.rand(16, 3, 32, 32, generator=g), None) for _ in range(2)]
    calibrate(graph, batches, 2, torch.device("cpu"), scheme)
    x = torch.rand(8, 3, 32, 32, generator=g)
    with torch.no_grad(), eval_mode(graph):
        ref = graph(x)
    with torch.no_grad():
        got = int8_model(graph)(x)
    assert (got - ref).abs().max() <= 0.05 * ref.abs().max() + 1e-4
