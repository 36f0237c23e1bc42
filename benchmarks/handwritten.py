"""The job of the quickstart written by hand in plain PyTorch + torchao + onnxruntime.

    python benchmarks/handwritten.py --out runs/handwritten       # ~10 min on 2 cores

What a competent user writes without pqd: an airbench94-style net (2x2 whitening-style
conv stem, conv -> max-pool -> BN -> GELU groups, max-pool head), trained with SGD-Nesterov,
label smoothing, bf16 autocast and channels_last; 50% global magnitude pruning with masks
re-applied after every step; INT8 QAT with torchao's PT2E flow and its stock
X86InductorQuantizer (export strict=True, numeric padding: the pitfalls of DESIGN.md are
avoided by hand); logit KD from the FP32 net; convert_pt2e; ONNX export with the dynamo
exporter; onnxruntime for accuracy. Only the data loading comes from pqd (so both jobs see
the same images, split and test set); everything else is plain library calls.

Writes OUT/fp32.onnx, OUT/int8.onnx and OUT/result.json (accuracies on the test split via
onnxruntime, epochs, wall seconds). benchmarks/vs_handwritten.py times the files beside
pqd's quickstart artifacts.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


class ConvGroup(nn.Module):
    """airbench94's group: conv -> max-pool -> BN -> GELU -> conv -> BN -> GELU."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.norm2 = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.norm1(self.pool(self.conv1(x))))
        return F.gelu(self.norm2(self.conv2(x)))


class AirNet(nn.Module):
    """airbench94-style: whitening-sized stem (2x2, 24 ch), groups 64/256/256, max-pool head."""

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, classes: int = 10) -> None:
        super().__init__()
        self.register_buffer("mean", mean.view(1, 3, 1, 1))
        self.register_buffer("std", std.view(1, 3, 1, 1))
        self.whiten = nn.Conv2d(3, 24, 2, bias=True)
        self.groups = nn.Sequential(ConvGroup(24, 64), ConvGroup(64, 256), ConvGroup(256, 256))
        self.pool = nn.MaxPool2d(3)
        self.head = nn.Linear(256, classes, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.gelu(self.whiten((x - self.mean) / self.std))
        x = self.pool(self.groups(x)).flatten(1)
        return self.head(x) / 9


def batches(x: torch.Tensor, y: torch.Tensor, bs: int, train: bool, gen: torch.Generator):
    """Float [0,1] batches; train: shuffled, random crop (reflect pad 2) and flip."""
    idx = torch.randperm(len(x), generator=gen) if train else torch.arange(len(x))
    for i in range(0, len(x), bs):
        xb = x[idx[i : i + bs]].float().div_(255)
        if train:
            xb = F.pad(xb, (2, 2, 2, 2), mode="reflect")
            dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()
            xb = xb[:, :, dy : dy + 32, dx : dx + 32]
            flip = torch.rand(len(xb), generator=gen) < 0.5
            xb[flip] = xb[flip].flip(3)
        yield xb.contiguous(memory_format=torch.channels_last), y[idx[i : i + bs]]


def train(
    model: nn.Module,
    data,
    epochs: int,
    lr: float,
    *,
    graph: bool = False,
    masks: dict[str, torch.Tensor] | None = None,
    teacher: nn.Module | None = None,
    seed: int = 0,
) -> None:
    """SGD-Nesterov, linear decay; optional masks and KD (T=4, alpha=0.9)."""
    from torchao.quantization.pt2e import move_exported_model_to_train

    gen = torch.Generator().manual_seed(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps = epochs * ((len(data.train_x) + 255) // 256)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    named = dict(model.named_parameters())
    if graph:
        move_exported_model_to_train(model)
    else:
        model.train()
    for _ in range(epochs):
        for xb, yb in batches(data.train_x, data.train_y, 256, True, gen):
            if graph:
                xb = xb.contiguous()
            with torch.autocast("cpu", torch.bfloat16, enabled=not graph):
                out = model(xb).float()
            loss = F.cross_entropy(out, yb, label_smoothing=0.2)
            if teacher is not None:
                with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
                    t = teacher(xb).float()
                kd = (
                    F.kl_div(
                        F.log_softmax(out / 4, 1),
                        F.log_softmax(t / 4, 1),
                        reduction="batchmean",
                        log_target=True,
                    )
                    * 16
                )
                loss = 0.9 * kd + 0.1 * loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if masks:
                with torch.no_grad():
                    for n, m in masks.items():
                        named[n].mul_(m)


def ort_accuracy(path: Path, x: torch.Tensor, y: torch.Tensor) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    preds = [
        s.run(None, {s.get_inputs()[0].name: x[i : i + 256].float().div(255).numpy()})[0].argmax(1)
        for i in range(0, len(x), 256)
    ]
    return float((np.concatenate(preds) == y.numpy()).mean())


def onnx_export(model: nn.Module, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=1024)
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (torch.rand(2, 3, 32, 32),),
            str(path),
            dynamo=True,
            external_data=False,
            dynamic_shapes=({0: batch},),
            input_names=["input"],
            output_names=["logits"],
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "handwritten")
    ap.add_argument(
        "--data-dir",
        default=os.environ.get(
            "PQD_DATA_DIR", str(ROOT.parent / "shared" / "data" / "cifar-10-subset")
        ),
    )
    ap.add_argument(
        "--epochs", type=int, nargs=4, default=[32, 2, 2, 2], metavar=("BASE", "PRUNE", "QAT", "KD")
    )
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    from torchao.quantization.pt2e import disable_observer, move_exported_model_to_eval
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer,
        get_default_x86_inductor_quantization_config,
    )

    from pqd.data import load_dataset  # data only: the same images and split as pqd

    t0 = time.perf_counter()
    data = load_dataset("cifar10", args.data_dir, val_size=500, seed=0, download=False)
    args.out.mkdir(parents=True, exist_ok=True)
    model = AirNet(torch.tensor(data.mean), torch.tensor(data.std)).to(
        memory_format=torch.channels_last
    )
    e_base, e_prune, e_qat, e_kd = args.epochs
    train(model, data, e_base, 0.2)  # baseline
    model.eval()
    teacher = copy.deepcopy(model).eval()
    onnx_export(
        copy.deepcopy(model).to(memory_format=torch.contiguous_format), args.out / "fp32.onnx"
    )

    weights = {n: p for n, p in model.named_parameters() if p.ndim > 1}  # prune 50% global
    flat = torch.cat([p.detach().abs().flatten() for p in weights.values()])
    cut = flat.kthvalue(len(flat) // 2).values
    masks = {n: (p.detach().abs() > cut) for n, p in weights.items()}
    with torch.no_grad():
        for n, p in weights.items():
            p.mul_(masks[n])
    train(model, data, e_prune, 0.05, masks=masks, seed=1)

    model = model.to(memory_format=torch.contiguous_format).train()
    ep = torch.export.export(
        model,
        (torch.rand(2, 3, 32, 32),),
        dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
        strict=True,
    )
    quantizer = X86InductorQuantizer().set_global(
        get_default_x86_inductor_quantization_config(is_qat=True)
    )
    qat = prepare_qat_pt2e(ep.module(), quantizer)
    train(qat, data, e_qat, 0.01, graph=True, masks=masks, seed=2)  # QAT
    train(qat, data, e_kd, 0.01, graph=True, masks=masks, teacher=teacher, seed=3)  # KD
    move_exported_model_to_eval(qat)
    qat.apply(disable_observer)
    int8 = convert_pt2e(qat)
    move_exported_model_to_eval(int8)
    onnx_export(int8, args.out / "int8.onnx")
    wall = time.perf_counter() - t0

    result = {
        "fp32_accuracy": ort_accuracy(args.out / "fp32.onnx", data.test_x, data.test_y),
        "int8_accuracy": ort_accuracy(args.out / "int8.onnx", data.test_x, data.test_y),
        "epochs": dict(zip(("baseline", "prune", "qat", "kd"), args.epochs, strict=True)),
        "sparsity": 0.5,
        "wall_s": round(wall, 1),
        "test_images": len(data.test_x),
    }
    (args.out / "result.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
