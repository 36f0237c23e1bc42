"""pqd.quant.qat_train: the views a QAT graph trains through compute what the graph computes
(the frozen view exactly the graph with BN in eval mode), train the graph's own parameters,
and freeze where asked; the exported file of a graph trained that way still matches it."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from helpers import onnx_weights, ort_logits, tiny
from pqd.models.fastnet import fastnet_q8
from pqd.onnx_export import export_onnx
from pqd.quant.prepare import prepare_qat
from pqd.quant.qat_train import QatSteps, freeze, is_frozen, qat_steps, training_view
from pqd.recipe import TrainSpec
from pqd.train import fit, set_train


def _graph(seed: int = 0) -> torch.fx.GraphModule:
    torch.manual_seed(seed)
    net = fastnet_q8(plan=(8, 16, "M", 16))
    for m in net.modules():  # BN statistics and affine terms far from the identity
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    g = prepare_qat(net, torch.randn(2, 3, 32, 32))
    with torch.no_grad():  # set the observers' ranges
        set_train(g, True)
        g(torch.randn(16, 3, 32, 32))
    return g


def test_frozen_view_is_the_graph_with_bn_in_eval_mode() -> None:
    g = _graph()
    freeze(g)
    x = torch.randn(8, 3, 32, 32)
    set_train(g, False)
    with torch.no_grad():
        ref = g(x)
    set_train(g, True)
    view, folded = training_view(g, frozen_bn=True)
    assert folded == 3  # every conv-BN pair
    assert "batch_norm" not in view.code and "batch_norm" in g.code  # the graph is untouched
    with torch.no_grad():
        assert torch.equal(view(x), ref)


def test_cast_view_is_the_graph_and_accepts_bf16() -> None:
    g = _graph()
    set_train(g, True)
    twin = copy.deepcopy(g)  # the same state: a call moves BN statistics and ranges
    view, folded = training_view(twin, frozen_bn=False)
    assert folded == 0 and "batch_norm" in view.code
    x = torch.randn(8, 3, 32, 32)
    assert torch.equal(view(x), g(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = view(x)  # the graph itself raises here (fake-quant rejects bf16)
    assert torch.isfinite(out.float()).all()


def test_views_train_the_graphs_own_parameters() -> None:
    g = _graph()
    freeze(g)
    set_train(g, True)
    view, _ = training_view(g, frozen_bn=True)
    means = {n: b.clone() for n, b in g.named_buffers() if n.endswith("running_mean")}
    opt = torch.optim.SGD(g.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in g.named_parameters()}
    loss = F.cross_entropy(view(torch.randn(8, 3, 32, 32)), torch.randint(0, 10, (8,)))
    loss.backward()
    opt.step()
    moved = [n for n, p in g.named_parameters() if not torch.equal(p, before[n])]
    assert any(n.endswith("0.weight") for n in moved) and len(moved) >= 6
    for n, b in g.named_buffers():  # frozen: statistics stay
        if n in means:
            assert torch.equal(b, means[n])


def test_steps_freeze_at_the_fraction_and_the_state_survives_a_reload() -> None:
    g = _graph()
    steps = QatSteps(g, freeze_at=0.5)
    first = steps.module_at(0, 10)
    assert not is_frozen(g) and "batch_norm" in first.code
    assert not is_frozen(g) and steps.module_at(4, 10) is first
    later = steps.module_at(5, 10)
    assert is_frozen(g) and "batch_norm" not in later.code
    assert steps.info() == {"freeze_step": 5, "folded_conv_bn": 3}
    # frozen is the observers' state: it travels with the state dict
    g2 = _graph(seed=1)
    g2.load_state_dict(g.state_dict())
    assert is_frozen(g2)
    assert "batch_norm" not in QatSteps(g2, freeze_at=None).module_at(0, 10).code
    assert qat_steps(tiny(), 0.1) is None  # an eager model trains as it is


def test_a_graph_trained_through_the_views_exports_a_matching_int8_file(tmp_path) -> None:
    g = _graph()
    xs = torch.rand(64, 3, 32, 32)
    ys = torch.randint(0, 10, (64,))
    batches = [(xs[i : i + 16], ys[i : i + 16]) for i in range(0, 64, 16)]

    class Loader:
        def __iter__(self):
            return iter(batches)

        def __len__(self) -> int:
            return len(batches)

    cfg = TrainSpec(lr=0.01, amp="bf16")
    steps = qat_steps(g, 0.25)
    res = fit(g, Loader(), cfg, 2, device=torch.device("cpu"), progress=False, steps=steps)
    assert res.steps == 8 and is_frozen(g)
    assert steps is not None and steps.info()["freeze_step"] == 2
    path, conv = export_onnx(g, tmp_path / "q.onnx", torch.rand(2, 3, 32, 32), quantized=True)
    assert all("scale" in w for w in onnx_weights(path))  # every weight through DequantizeLinear
    x = torch.rand(32, 3, 32, 32)
    set_train(conv, False)
    with torch.no_grad():
        ref = conv(x).numpy()
    out = ort_logits(path, x.numpy())
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.95
