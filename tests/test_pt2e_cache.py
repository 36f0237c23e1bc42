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


# ------------------------------------------------------------------ the patterns on disk


def _conv_relu(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.conv2d(x, w).relu()


def _wrapped(fn):
    """A pattern as torchao hands it to the tracer (its WrapperModule around a function)."""
    from torchao.quantization.pt2e.export_utils import WrapperModule

    return WrapperModule(fn)


def _pattern_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(1, 1, 3, 3), torch.randn(1, 1, 1, 1)


def _torchao_trace():
    from torchao.quantization.pt2e import utils

    fn = utils._get_aten_graph_module_for_pattern
    return getattr(fn, "__wrapped__", fn)  # torchao's own, whether patched or not


def test_disk_key_is_stable_and_tells_patterns_apart() -> None:
    """The key describes code and closure values without object addresses: two closures of
    the same factory with equal values share it; another value, shape or kwarg changes it;
    a closure over an object with no stable description gets no key (traced, not stored)."""

    def make(conv, flag):
        def pattern(x, w):
            return conv(x, w) if flag else conv(x, w).relu()

        return pattern

    conv2d, conv1d = torch.nn.functional.conv2d, torch.nn.functional.conv1d
    x = _pattern_inputs()
    key = _pt2e_cache.disk_key
    a = key(make(conv2d, True), x, False, {})
    assert a is not None and a == key(make(conv2d, True), x, False, {})
    assert (
        len({a, key(make(conv2d, False), x, False, {}), key(make(conv1d, True), x, False, {})}) == 3
    )
    assert a != key(make(conv2d, True), (torch.randn(1, 1, 4, 4), x[1]), False, {})
    assert a != key(make(conv2d, True), x, False, {"k": 1})
    assert key(make(object(), True), x, False, {}) is None

    def scaled(k):  # a factory's function: its captured value is part of the key
        def fn(t):
            return t * k

        return fn

    assert key(make(scaled(2), True), x, False, {}) != key(make(scaled(3), True), x, False, {})


def test_a_stored_pattern_is_served_to_a_new_process_without_tracing(tmp_path) -> None:
    """First memo (a process): traced by torchao, written. Second memo with the same store
    (the next process): loaded, torchao's tracer not called, the same graph node for node.
    A broken file is traced again and replaced; a program that would not give torchao's
    graph is not written."""
    torchao_trace = _torchao_trace()
    calls = []

    def trace(pattern, example_inputs, is_cuda=False, **kwargs):
        calls.append(pattern)
        return torchao_trace(pattern, example_inputs, is_cuda, **kwargs)

    store = _pt2e_cache.PatternStore(tmp_path / "patterns")
    x = _pattern_inputs()
    first = _pt2e_cache._memoised(trace, store)(_wrapped(_conv_relu), x)
    assert len(calls) == 1 and len(list(store.folder.glob("*.pt2"))) == 1
    second = _pt2e_cache._memoised(trace, store)(_wrapped(_conv_relu), x)
    assert len(calls) == 1  # served from disk
    assert _pt2e_cache._graph_text(second) == _pt2e_cache._graph_text(first)
    assert torch.equal(second(*x), first(*x))

    (path,) = store.folder.glob("*.pt2")
    path.write_bytes(b"not a program")
    third = _pt2e_cache._memoised(trace, store)(_wrapped(_conv_relu), x)
    assert len(calls) == 2 and _pt2e_cache._graph_text(third) == _pt2e_cache._graph_text(first)
    assert store.load(path.stem) is not None  # replaced by a good file

    other = torchao_trace(_wrapped(lambda x, w: torch.nn.functional.conv2d(x, w)), x)
    program = torch.export.export(_wrapped(_conv_relu), x, strict=True)
    assert not store.save("mismatch", program, other)
    assert not (store.folder / "mismatch.pt2").exists() and not list(store.folder.glob("*.tmp"))


def test_the_disk_layer_can_be_turned_off(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("PQD_CACHE_DIR", str(tmp_path))
    assert _pt2e_cache.default_store().folder == tmp_path / "pt2e-patterns"
    monkeypatch.setenv(_pt2e_cache.DISK_ENV, "0")
    assert _pt2e_cache.default_store() is None
