"""The PT2E pattern cache changes nothing but speed: same prepared and converted graphs."""

from __future__ import annotations

import copy

import pytest
import torch

from pqd import _pt2e_cache
from pqd.models import build_model
from pqd.onnx_export import int8_model
from pqd.quant.prepare import prepare_qat
from pqd.train import set_train


def _graph_text(gm: torch.fx.GraphModule) -> list[str]:
    return [f"{n.op} {n.target} {n.args}" for n in gm.graph.nodes]


@pytest.fixture
def unpatched(monkeypatch: pytest.MonkeyPatch):
    """Within the test, torchao runs its original (uncached, unfiltered) functions."""
    from torchao.quantization.pt2e import qat_utils, utils

    assert _pt2e_cache.install()

    def restore() -> None:
        for mod in (utils, qat_utils):
            fn = mod._get_aten_graph_module_for_pattern
            monkeypatch.setattr(mod, "_get_aten_graph_module_for_pattern", fn.__wrapped__)
        for name in ("_fuse_conv_bn_qat_helper", "_fold_conv_bn_qat_helper"):
            monkeypatch.setattr(qat_utils, name, getattr(qat_utils, name).__wrapped__)

    return restore


@pytest.mark.slow
def test_cached_convert_equals_torchao(unpatched) -> None:
    torch.manual_seed(0)
    model = build_model("tiny_resnet", 4, [0.5] * 3, [0.25] * 3)
    x = torch.rand(4, 3, 32, 32)
    graph = prepare_qat(model, x[:2])  # patched
    graph(x)  # observers see data
    set_train(graph, False)
    fast = int8_model(copy.deepcopy(graph))
    fast_again = int8_model(copy.deepcopy(graph))  # served from the cache
    unpatched()
    slow = int8_model(copy.deepcopy(graph))
    assert _graph_text(fast) == _graph_text(slow) == _graph_text(fast_again)
    with torch.no_grad():
        assert torch.equal(fast(x), slow(x))

    reference = prepare_qat(copy.deepcopy(model), x[:2])  # unpatched prepare
    assert _graph_text(reference) == _graph_text(prepare_qat_patched(model, x))


def prepare_qat_patched(model: torch.nn.Module, x: torch.Tensor) -> torch.fx.GraphModule:
    """prepare_qat with the cache back in place (the fixture's monkeypatch is undone here)."""
    from torchao.quantization.pt2e import qat_utils, utils

    saved = (
        utils._get_aten_graph_module_for_pattern,
        qat_utils._get_aten_graph_module_for_pattern,
        qat_utils._fuse_conv_bn_qat_helper,
    )
    memo = _pt2e_cache._memoised(saved[0])
    utils._get_aten_graph_module_for_pattern = qat_utils._get_aten_graph_module_for_pattern = memo
    qat_utils._fuse_conv_bn_qat_helper = _pt2e_cache._skip_absent_convs(saved[2])
    try:
        graph = prepare_qat(copy.deepcopy(model), x[:2])
        assert memo.cache  # the patterns were traced through the cache
        return graph
    finally:
        (
            utils._get_aten_graph_module_for_pattern,
            qat_utils._get_aten_graph_module_for_pattern,
            qat_utils._fuse_conv_bn_qat_helper,
        ) = saved


def test_cache_key_tells_patterns_apart() -> None:
    def make(flag: bool):
        def pattern(x):
            return x + 1 if flag else x - 1

        return pattern

    calls = []

    def trace(pattern, example_inputs, is_cuda=False, **kwargs):
        calls.append(pattern)
        gm = torch.fx.symbolic_trace(pattern)
        return gm

    memo = _pt2e_cache._memoised(trace)
    x = (torch.zeros(2),)
    a1, a2, b = memo(make(True), x), memo(make(True), x), memo(make(False), x)
    memo(make(True), (torch.zeros(3),))  # another shape: another trace
    assert len(calls) == 3
    assert a1 is not a2  # copies, never the cached object
    assert torch.equal(a1(torch.zeros(2)), torch.ones(2))
    assert torch.equal(b(torch.zeros(2)), -torch.ones(2))
