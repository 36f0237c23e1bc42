"""Checks the GPU path and prints epoch time on CUDA vs CPU, side by side in one run.

    python benchmarks/gpu.py                       # resnet18 (CIFAR), 1 epoch per step
    python benchmarks/gpu.py --model fastnet --epochs 2 --limit-train 4000

Runs the same :func:`pqd.compress` job (baseline epochs -> prune 50% -> INT8 QAT -> KD, on
the real CIFAR-10 subset) once with ``device="cuda"`` and once with ``device="cpu"``: the
CUDA run trains with AMP and channels_last (``train.amp: auto``), then exports and measures
the INT8 file on the CPU runtime like every run. Prints, per device, the seconds of each
step, training images/s, the final file's top-1 and its parity with the torch model, and
the CPU/CUDA time ratios. Without a CUDA GPU it prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def _data_dir(arg: str | None) -> Path:
    for d in (arg, os.environ.get("PQD_DATA_DIR"), ROOT.parent / "shared/data/cifar-10-subset"):
        if d and (Path(d) / "cifar-10-batches-py").is_dir():
            return Path(d)
    print(
        "gpu: error: no CIFAR-10 files found; fix: pass --data-dir DIR or set PQD_DATA_DIR",
        file=sys.stderr,
    )
    sys.exit(2)


def job(model_name: str, data: Any, device: str, epochs: int, out: Path) -> dict[str, Any]:
    """One compress run on ``device``; its record's timings, accuracy and parity."""
    import pqd
    from pqd.models import build_model

    model = build_model(model_name, data.num_classes, data.mean, data.std)
    stages = [
        pqd.Prune(sparsity=0.5, epochs=epochs),
        pqd.Quantize(epochs=epochs),
        pqd.Distill(epochs=epochs),
    ]
    res = pqd.compress(
        model,
        data,
        stages,
        out,
        baseline_epochs=epochs,
        device=device,
        train={"amp": "auto", "channels_last": True},
        measure={"runtimes": ["onnxruntime"], "batch_sizes": [1]},
        fresh=True,
    )
    return res.record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--epochs", type=int, default=1, help="epochs per step")
    ap.add_argument("--limit-train", type=int, default=None)
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print(
            f"gpu: no CUDA GPU visible (torch {torch.__version__}, CUDA build: "
            f"{torch.version.cuda or 'none'}); run this on a machine with a GPU and a CUDA "
            "build of torch",
            file=sys.stderr,
        )
        return 2
    from pqd.data import load_dataset

    data = load_dataset(
        "cifar10",
        _data_dir(args.data_dir),
        val_size=500,
        download=False,
        limit_train=args.limit_train,
    )
    n = len(data.train_y)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for device in ("cuda", "cpu"):
            results[device] = job(args.model, data, device, args.epochs, Path(tmp) / device)
    env = results["cpu"]["environment"]
    print(
        f"GPU: {torch.cuda.get_device_name(0)}; CPU: {env['cpu']} ({', '.join(env['cpu_flags'])})"
    )
    print(f"{args.model}, {n} training images (CIFAR-10 subset), {args.epochs} epoch(s) per step\n")
    print(
        "| device | baseline s | stages s | train images/s | final top-1 | parity (onnxruntime) |"
    )
    print("|---|---|---|---|---|---|")
    for device, r in results.items():
        t = r["timing_s"]
        stages_s = float(t["stages"])
        steps = 4 * args.epochs * n
        rt = r["final"]["runtimes"]["onnxruntime"]
        print(
            f"| {device} | {t['baseline']:.1f} | {stages_s:.1f} | "
            f"{steps / (t['baseline'] + stages_s):.0f} | {100 * rt['accuracy']:.2f}% | "
            f"{100 * r['final']['parity']['top1_agreement']:.2f}% |"
        )
    cpu, gpu = results["cpu"]["timing_s"], results["cuda"]["timing_s"]
    print(
        f"\nCPU / CUDA time: baseline {cpu['baseline'] / gpu['baseline']:.1f}x, "
        f"stages {float(cpu['stages']) / float(gpu['stages']):.1f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
