"""Vision transformers (pqd.models.vit): the zoo contract, INT8 export that onnxruntime runs
with integer kernels (QGemm for every linear), and parity with the converted torch model."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from helpers import MEAN, STD, ort_logits
from pqd.data import load_dataset
from pqd.models import build_model
from pqd.models.vit import TokenLinear, ViT
from pqd.prune.channels import count_macs


def vit(name: str = "vit_tiny", seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    return build_model(name, 10, MEAN, STD, **kwargs)


def test_vit_small_size_and_contract() -> None:
    model = vit("vit_small")
    net = model.net
    assert isinstance(net, ViT)
    params = sum(p.numel() for p in model.parameters())
    assert 1_000_000 <= params <= 6_000_000
    assert 100e6 <= count_macs(model, torch.rand(1, 3, 32, 32)) <= 200e6
    assert net.default_exit_points == [2, 4]  # after blocks 2 and 4 of 6
    assert len(net.features) == 7  # tokenizer + 6 blocks


def test_forward_is_classifier_of_features_and_blocks_keep_token_shape() -> None:
    model = vit().eval()
    x = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        tokens = model.net.features[0]((x - model.norm.mean) / model.norm.std)
        assert tokens.shape == (3, 17, 32)  # class token + 4x4 patches, dim 32
        for block in model.net.features[1:]:
            assert block(tokens).shape == tokens.shape
        manual = model.net.classifier(model.net.features((x - model.norm.mean) / model.norm.std))
        torch.testing.assert_close(model(x), manual)
    assert manual.shape == (3, 10)


def test_train_step_reaches_every_parameter() -> None:
    model = vit().train()
    loss = F.cross_entropy(model(torch.rand(8, 3, 32, 32)), torch.randint(0, 10, (8,)))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_token_linear_matches_linear_on_3d_input() -> None:
    torch.manual_seed(0)
    tl = TokenLinear(6, 5)
    x = torch.randn(2, 7, 6)
    torch.testing.assert_close(tl(x), F.linear(x, tl.weight, tl.bias))


def test_bad_sizes_are_model_errors() -> None:
    from pqd.errors import ModelError

    with pytest.raises(ModelError, match="num_heads"):
        build_model("vit_tiny", 10, MEAN, STD, dim=30, num_heads=4)


def _calibrated_qat(model: nn.Module, x: torch.Tensor) -> nn.Module:
    from pqd.quant.prepare import prepare_qat
    from pqd.train import set_train

    graph = prepare_qat(model, x[:8])
    set_train(graph, True)
    with torch.no_grad():
        for i in range(0, len(x), 16):
            graph(x[i : i + 16])
    set_train(graph, False)
    return graph


def quick_trained(data, name: str = "vit_tiny", epochs: int = 3, n: int = 512) -> nn.Module:
    """``name`` after a few AdamW epochs on ``n`` real training images (meaningful logits)."""
    model = vit(name)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = data.train_x[:n].float() / 255, data.train_y[:n]
    model.train()
    for _ in range(epochs):
        for i in range(0, n, 64):
            loss = F.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model


@pytest.fixture(scope="module")
def subset(subset_dir: Path):
    return load_dataset("cifar10", str(subset_dir), val_size=100, seed=0, download=False)


@pytest.mark.slow
def test_int8_export_runs_every_linear_as_qgemm_with_parity(tmp_path: Path, subset) -> None:
    from pqd.measurement.parity import parity, torch_predict
    from pqd.measurement.runtime import ort_kernels
    from pqd.onnx_export import export_onnx

    model = quick_trained(subset)
    images = subset.val_x
    x = images.float() / 255
    graph = _calibrated_qat(model, x)
    path, deploy = export_onnx(graph, tmp_path / "vit.onnx", x, quantized=True)
    kernels = ort_kernels(path)
    n_linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    n_convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    # every linear is an integer matmul, every conv an integer conv: none left in float
    assert kernels.get("QGemm") == n_linears, kernels
    assert kernels.get("QLinearConv") == n_convs, kernels
    assert "Gemm" not in kernels and "Conv" not in kernels and "FusedGemm" not in kernels
    # both attention matmuls of every block on integer kernels
    blocks = len(model.net.features) - 1
    assert kernels.get("QLinearMatMul") == blocks, kernels  # attn @ v
    assert kernels.get("MatMulIntegerToFloat") == blocks, kernels  # q @ k^T
    assert "MatMul" not in kernels and "FusedMatMul" not in kernels, kernels
    # float residual stream, LayerNorm and GELU read float: no requantize of the stream
    # (QLinearAdd) and no DequantizeLinear in a block; the quantizers left are each
    # linear's / matmul's input
    assert "QLinearAdd" not in kernels, kernels
    # left: the tokenizer's flattened output, the position-embedding add, the logits
    assert kernels.get("DequantizeLinear", 0) <= 3, kernels
    assert _dequantized_inputs(path, ("LayerNormalization", "Gelu")) == 0
    got = ort_logits(path, x.numpy())
    with torch.no_grad():
        ref = torch_predict(deploy, images)
    # with the stream, LayerNorm and GELU in float only requantize ties of the linear /
    # softmax inputs differ (measured: 100% agreement, logits within 0.02; with integer
    # residual adds it was 98.4%)
    check = parity(ref, got)
    assert check["top1_agreement"] >= 0.99
    assert check["max_abs_logit_diff"] <= 0.05


def _dequantized_inputs(path: Path, ops: tuple[str, ...]) -> int:
    """How many ``ops`` nodes of onnxruntime's optimized graph read a DequantizeLinear."""
    from pqd.measurement.runtime import ort_optimized

    proto = ort_optimized(path)
    dq = {o for n in proto.graph.node if n.op_type == "DequantizeLinear" for o in n.output}
    return sum(n.op_type in ops and any(i in dq for i in n.input) for n in proto.graph.node)


# ---------------------------------------------------------------------------- pruning


def _magnitude(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().abs() for n, p in model.named_parameters() if n.endswith("weight")}


def test_head_pruning_removes_whole_heads_for_real(tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    from pqd.onnx_export import export_onnx
    from pqd.prune.channels import apply_structure, plan_records
    from pqd.recipe import PruneChannelsSpec

    model = vit(num_heads=4).eval()  # dim 32: 4 heads of 8
    x = torch.rand(4, 3, 32, 32)
    spec = PruneChannelsSpec(ratio=0.5, exclude=["net.features.0.*"])
    records = plan_records(model, x[:2], _magnitude(model), 0.5, spec)
    by_layer = {r["layer"]: r for r in records}
    qkv = by_layer["net.features.1.attn.qkv"]
    kept = qkv["kept"]
    assert len(kept) == 3 * 2 * 8  # 2 of 4 heads, in q, k and v
    heads = sorted({(c % 32) // 8 for c in kept})
    assert len(heads) == 2 and all(c // 32 in (0, 1, 2) for c in kept)
    # reference: the unpruned block with the dropped heads' projection inputs zeroed
    dropped = [h for h in range(4) if h not in heads]
    block = copy.deepcopy(model.net.features[1])
    with torch.no_grad():
        for h in dropped:
            block.attn.proj.weight[:, h * 8 : (h + 1) * 8] = 0
        tokens = torch.randn(3, 17, 32)
        want = block.attn(block.norm1(tokens))
    params, macs = sum(p.numel() for p in model.parameters()), count_macs(model, x[:1])
    apply_structure(model, x[:2], [qkv])
    attn = model.net.features[1].attn
    assert attn.num_heads == 2 and attn.qkv.weight.shape == (48, 32)
    assert attn.proj.weight.shape == (32, 16)  # dense and smaller, not masked
    with torch.no_grad():
        torch.testing.assert_close(attn(block.norm1(tokens)), want, atol=1e-5, rtol=1e-5)
    assert sum(p.numel() for p in model.parameters()) < params
    assert count_macs(model, x[:1]) < macs
    # the exported graph has 2 heads in block 1 (qkv Gemm rows = 3 x heads x head_dim)
    path, _ = export_onnx(model, tmp_path / "pruned.onnx", x, quantized=False)
    proto = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    qkv_rows = sorted(inits[n.input[1]].shape[0] for n in proto.graph.node if n.op_type == "Gemm")
    assert qkv_rows.count(48) == 1 and qkv_rows.count(96) == 1  # block 1: 2 heads, block 2: 4
    # the record's MACs, read from the file, count every token of the 2-D linears
    from pqd.measurement.complexity import onnx_complexity

    assert onnx_complexity(path)["macs"] == count_macs(model, x[:1])
    with torch.no_grad():
        ref = model(x).numpy()
    np.testing.assert_allclose(ort_logits(path, x.numpy()), ref, atol=1e-4, rtol=1e-4)


def test_mlp_units_and_heads_pruned_by_the_plan() -> None:
    from pqd.prune.channels import apply_structure, plan_records
    from pqd.recipe import PruneChannelsSpec

    model = vit(num_heads=4).eval()
    x = torch.rand(2, 3, 32, 32)
    spec = PruneChannelsSpec(ratio=0.5, round_to=8, exclude=["net.features.0.*"])
    records = plan_records(model, x, _magnitude(model), 0.5, spec)
    apply_structure(model, x, records)
    for block in model.net.features[1:]:
        assert block.attn.num_heads == 2
        assert block.mlp.fc1.out_features == 32 and block.mlp.fc2.in_features == 32
    assert model(x).shape == (2, 10)


def test_unstructured_pruning_masks_linear_weights_only() -> None:
    from pqd.prune.masks import prunable_parameters

    names = set(prunable_parameters(vit()))
    assert "net.features.1.attn.qkv.weight" in names and "net.features.2.mlp.fc2.weight" in names
    assert not any("pos_embed" in n or "cls_token" in n for n in names)


# ---------------------------------------------------------------------------- early exit


def test_early_exit_reads_the_class_token_after_chosen_blocks() -> None:
    from pqd.models.multi_exit import build_multi_exit, exit_costs
    from pqd.models.vit import ClassTokenHead

    model = vit(depth=3).eval()
    x = torch.rand(4, 3, 32, 32)
    net = build_multi_exit(model, [1, 2], 10, x)
    assert all(isinstance(h, ClassTokenHead) for h in net.heads)
    with torch.no_grad():
        outs = net.forward_all(x)
        torch.testing.assert_close(outs[-1], model(x))  # exits off: the original network
        # exit 0 is the class-token head on block 1's tokens
        tokens = model.net.features[1](model.net.features[0](model.norm(x)))
        torch.testing.assert_close(outs[0], net.heads[0](tokens))
    assert [o.shape for o in outs] == [(4, 10)] * 3
    # costs count every token of every linear: leaving after block 1 is cheaper than at the end
    costs = exit_costs(net.part_macs)
    assert costs[0] < costs[1] < costs[2]
    assert net.part_macs["segments"][1] == 17 * 4 * 32 * 32 + 17 * 2 * 32 * 64  # one block
